//! The NATS client protocol parser: a pure, incremental function over bytes.
//! `parse` looks at the start of a buffer and returns one complete operation and
//! how many bytes it used, or `Incomplete` when more bytes are needed. It never
//! panics, and it rejects an over-long control line or an over-size payload from
//! the declared size alone, so a peer cannot make the buffer grow without bound.

/// Limits enforced while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest control line (the part before CRLF), in bytes.
    pub max_control_line: usize,
    /// Largest payload (headers included) a publish may declare.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_line: 4096,
            max_payload: 1024 * 1024,
        }
    }
}

/// One operation sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Connect(&'a [u8]),
    Pub {
        subject: &'a [u8],
        reply: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    /// A publish with headers: `headers` is the header block (`NATS/1.0\r\n...\r\n\r\n`).
    HPub {
        subject: &'a [u8],
        reply: Option<&'a [u8]>,
        headers: &'a [u8],
        payload: &'a [u8],
    },
    Sub {
        subject: &'a [u8],
        queue: Option<&'a [u8]>,
        sid: &'a [u8],
    },
    Unsub {
        sid: &'a [u8],
        max: Option<u64>,
    },
    Ping,
    Pong,
    /// `+OK`, `-ERR` and `INFO` from a client carry nothing the server acts on.
    Ignored,
}

#[derive(Debug)]
pub enum Parsed<'a> {
    /// A complete operation and the number of bytes it used.
    Op(Op<'a>, usize),
    Incomplete,
}

/// Why the bytes are not the NATS protocol. Every one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown protocol operation")]
    UnknownOp,
    #[error("maximum control line exceeded")]
    MaxControlLine,
    #[error("maximum payload exceeded: {size} > {max}")]
    MaxPayload { size: usize, max: usize },
    #[error("malformed {0} arguments")]
    BadArgs(&'static str),
    #[error("message payload not followed by CRLF")]
    MissingCrlf,
}

impl ProtoError {
    /// The `-ERR` text nats-server sends for the same fault.
    pub fn err_text(&self) -> &'static str {
        match self {
            ProtoError::MaxControlLine => "Maximum Control Line Exceeded",
            ProtoError::MaxPayload { .. } => "Maximum Payload Violation",
            ProtoError::UnknownOp | ProtoError::BadArgs(_) | ProtoError::MissingCrlf => {
                "Unknown Protocol Operation"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Connect,
    Pub,
    HPub,
    Sub,
    Unsub,
    Ping,
    Pong,
    PlusOk,
    MinusErr,
    Info,
}

const VERBS: [(&[u8], Verb); 10] = [
    (b"CONNECT", Verb::Connect),
    (b"PUB", Verb::Pub),
    (b"HPUB", Verb::HPub),
    (b"SUB", Verb::Sub),
    (b"UNSUB", Verb::Unsub),
    (b"PING", Verb::Ping),
    (b"PONG", Verb::Pong),
    (b"+OK", Verb::PlusOk),
    (b"-ERR", Verb::MinusErr),
    (b"INFO", Verb::Info),
];

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Parses one operation from the start of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ProtoError> {
    let token_end = buf
        .iter()
        .position(|&b| is_space(b) || b == b'\r' || b == b'\n');
    let token = &buf[..token_end.unwrap_or(buf.len())];
    let verb = VERBS
        .iter()
        .find(|(name, _)| token.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v);
    let Some(verb) = verb else {
        // Reject as soon as the bytes cannot begin any verb, as nats-server does.
        let could_grow = token_end.is_none()
            && VERBS.iter().any(|(name, _)| {
                name.len() > token.len() && name[..token.len()].eq_ignore_ascii_case(token)
            });
        return if could_grow {
            Ok(Parsed::Incomplete)
        } else {
            Err(ProtoError::UnknownOp)
        };
    };

    let Some(nl) = buf
        .iter()
        .take(limits.max_control_line + 2)
        .position(|&b| b == b'\n')
    else {
        return if buf.len() > limits.max_control_line + 1 {
            Err(ProtoError::MaxControlLine)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    if line.len() > limits.max_control_line {
        return Err(ProtoError::MaxControlLine);
    }
    let rest = &line[token.len()..];
    let after_line = nl + 1;
    // Verbs with arguments need a space before them.
    let needs_args = matches!(
        verb,
        Verb::Connect | Verb::Pub | Verb::HPub | Verb::Sub | Verb::Unsub
    );
    if needs_args && !rest.first().copied().is_some_and(is_space) {
        return Err(ProtoError::UnknownOp);
    }
    let mut args_buf: [&[u8]; 5] = [&[]; 5];
    let args = split_args(rest, &mut args_buf);

    let op = match verb {
        Verb::Ping => Op::Ping,
        Verb::Pong => Op::Pong,
        Verb::PlusOk | Verb::MinusErr | Verb::Info => Op::Ignored,
        Verb::Connect => Op::Connect(trim(rest)),
        Verb::Sub => match args {
            [subject, sid] => Op::Sub {
                subject,
                queue: None,
                sid,
            },
            [subject, queue, sid] => Op::Sub {
                subject,
                queue: Some(queue),
                sid,
            },
            _ => return Err(ProtoError::BadArgs("SUB")),
        },
        Verb::Unsub => match args {
            [sid] => Op::Unsub { sid, max: None },
            [sid, max] => Op::Unsub {
                sid,
                max: Some(parse_size(max).ok_or(ProtoError::BadArgs("UNSUB"))? as u64),
            },
            _ => return Err(ProtoError::BadArgs("UNSUB")),
        },
        Verb::Pub => {
            let (subject, reply, size) = match args {
                [subject, size] => (*subject, None, *size),
                [subject, reply, size] => (*subject, Some(*reply), *size),
                _ => return Err(ProtoError::BadArgs("PUB")),
            };
            let size = parse_size(size).ok_or(ProtoError::BadArgs("PUB"))?;
            check_payload(size, limits)?;
            let Some(payload) = payload_at(buf, after_line, size)? else {
                return Ok(Parsed::Incomplete);
            };
            return Ok(Parsed::Op(
                Op::Pub {
                    subject,
                    reply,
                    payload,
                },
                after_line + size + 2,
            ));
        }
        Verb::HPub => {
            let (subject, reply, hdr, total) = match args {
                [subject, hdr, total] => (*subject, None, *hdr, *total),
                [subject, reply, hdr, total] => (*subject, Some(*reply), *hdr, *total),
                _ => return Err(ProtoError::BadArgs("HPUB")),
            };
            let hdr = parse_size(hdr).ok_or(ProtoError::BadArgs("HPUB"))?;
            let total = parse_size(total).ok_or(ProtoError::BadArgs("HPUB"))?;
            if hdr > total {
                return Err(ProtoError::BadArgs("HPUB"));
            }
            check_payload(total, limits)?;
            let Some(all) = payload_at(buf, after_line, total)? else {
                return Ok(Parsed::Incomplete);
            };
            let (headers, payload) = all.split_at(hdr);
            return Ok(Parsed::Op(
                Op::HPub {
                    subject,
                    reply,
                    headers,
                    payload,
                },
                after_line + total + 2,
            ));
        }
    };
    Ok(Parsed::Op(op, after_line))
}

fn check_payload(size: usize, limits: &Limits) -> Result<(), ProtoError> {
    if size > limits.max_payload {
        return Err(ProtoError::MaxPayload {
            size,
            max: limits.max_payload,
        });
    }
    Ok(())
}

/// The `size` bytes after the control line, if they and their CRLF are here.
fn payload_at(buf: &[u8], start: usize, size: usize) -> Result<Option<&[u8]>, ProtoError> {
    let end = start + size;
    if buf.len() < end + 2 {
        // Bytes already here that cannot be the CRLF fail fast.
        if buf.len() > end && buf[end] != b'\r' {
            return Err(ProtoError::MissingCrlf);
        }
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtoError::MissingCrlf);
    }
    Ok(Some(&buf[start..end]))
}

/// Splits on spaces and tabs into `out`; more than `out` holds is reported as
/// an extra empty slice so callers see a wrong count.
fn split_args<'a, 'b>(s: &'a [u8], out: &'b mut [&'a [u8]; 5]) -> &'b [&'a [u8]] {
    let mut n = 0;
    for part in s.split(|&b| is_space(b)).filter(|p| !p.is_empty()) {
        if n == out.len() {
            return &out[..];
        }
        out[n] = part;
        n += 1;
    }
    &out[..n]
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_space(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// A decimal size: digits only, at most 9 of them (as nats-server).
fn parse_size(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> Result<(Op<'_>, usize), ProtoError> {
        match parse(input, &Limits::default())? {
            Parsed::Op(op, n) => Ok((op, n)),
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(input)),
        }
    }

    fn incomplete(input: &[u8]) -> bool {
        matches!(parse(input, &Limits::default()), Ok(Parsed::Incomplete))
    }

    #[test]
    fn parses_each_operation() {
        assert_eq!(one(b"PING\r\n").unwrap(), (Op::Ping, 6));
        assert_eq!(one(b"pong\r\n").unwrap(), (Op::Pong, 6));
        assert_eq!(one(b"PING\n").unwrap(), (Op::Ping, 5));
        assert_eq!(one(b"+OK\r\n").unwrap(), (Op::Ignored, 5));
        assert_eq!(
            one(b"CONNECT {\"verbose\":false}\r\n").unwrap().0,
            Op::Connect(b"{\"verbose\":false}")
        );
        assert_eq!(
            one(b"PUB foo 5\r\nhello\r\n").unwrap(),
            (
                Op::Pub {
                    subject: b"foo",
                    reply: None,
                    payload: b"hello"
                },
                18
            )
        );
        assert_eq!(
            one(b"pub foo\tbar  0\r\n\r\n").unwrap().0,
            Op::Pub {
                subject: b"foo",
                reply: Some(b"bar"),
                payload: b""
            }
        );
        assert_eq!(
            one(b"HPUB foo r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n")
                .unwrap()
                .0,
            Op::HPub {
                subject: b"foo",
                reply: Some(b"r"),
                headers: b"NATS/1.0\r\n\r\n",
                payload: b"hi"
            }
        );
        assert_eq!(
            one(b"SUB foo 1\r\n").unwrap().0,
            Op::Sub {
                subject: b"foo",
                queue: None,
                sid: b"1"
            }
        );
        assert_eq!(
            one(b"SUB foo q 1\r\n").unwrap().0,
            Op::Sub {
                subject: b"foo",
                queue: Some(b"q"),
                sid: b"1"
            }
        );
        assert_eq!(
            one(b"UNSUB 1\r\n").unwrap().0,
            Op::Unsub {
                sid: b"1",
                max: None
            }
        );
        assert_eq!(
            one(b"UNSUB 1 10\r\n").unwrap().0,
            Op::Unsub {
                sid: b"1",
                max: Some(10)
            }
        );
    }

    #[test]
    fn payload_may_contain_crlf_and_protocol_text() {
        let (op, n) = one(b"PUB a 10\r\nPING\r\n\r\nxx\r\nPING\r\n").unwrap();
        assert_eq!(
            op,
            Op::Pub {
                subject: b"a",
                reply: None,
                payload: b"PING\r\n\r\nxx"
            }
        );
        assert_eq!(n, 22);
    }

    #[test]
    fn bad_input_is_rejected_with_nats_server_texts() {
        for bad in [
            &b"ZZZ"[..],
            b"PUBS foo 2\r\nok\r\n",
            b"SUBZZZ foo 1\r\n",
            b"MSG foo 1 2\r\n",
            b"\r\n",
            b"PUBfoo 1\r\n",
        ] {
            let err = parse(bad, &Limits::default()).unwrap_err();
            assert_eq!(
                err.err_text(),
                "Unknown Protocol Operation",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"PUB foo\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("PUB")
        );
        assert_eq!(
            parse(b"PUB foo x\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("PUB")
        );
        assert_eq!(
            parse(b"PUB foo -1\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("PUB")
        );
        assert_eq!(
            parse(b"SUB foo\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("SUB")
        );
        assert_eq!(
            parse(b"SUB a b c d\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("SUB")
        );
        assert_eq!(
            parse(b"HPUB foo 5 2\r\n", &Limits::default()).unwrap_err(),
            ProtoError::BadArgs("HPUB")
        );
        assert_eq!(
            parse(b"UNSUB\r\n", &Limits::default()).unwrap_err(),
            ProtoError::UnknownOp
        );
        assert_eq!(
            parse(b"PUB foo 2\r\nokXX", &Limits::default()).unwrap_err(),
            ProtoError::MissingCrlf
        );
        assert_eq!(
            parse(b"PUB foo 2\r\nokX", &Limits::default()).unwrap_err(),
            ProtoError::MissingCrlf
        );
    }

    #[test]
    fn max_payload_is_checked_on_the_declared_size_before_the_payload() {
        let limits = Limits {
            max_control_line: 4096,
            max_payload: 10,
        };
        assert_eq!(
            parse(b"PUB foo 11\r\n", &limits).unwrap_err(),
            ProtoError::MaxPayload { size: 11, max: 10 }
        );
        assert_eq!(
            parse(b"PUB foo 11\r\n", &limits).unwrap_err().err_text(),
            "Maximum Payload Violation"
        );
        assert!(matches!(
            parse(b"PUB foo 10\r\n", &limits),
            Ok(Parsed::Incomplete)
        ));
    }

    #[test]
    fn max_control_line_without_a_newline() {
        let limits = Limits {
            max_control_line: 16,
            max_payload: 10,
        };
        let mut long = b"PUB ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 40));
        assert_eq!(
            parse(&long, &limits).unwrap_err(),
            ProtoError::MaxControlLine
        );
        assert!(matches!(
            parse(b"PUB aaaaaaaa", &limits),
            Ok(Parsed::Incomplete)
        ));
        long.extend_from_slice(b" 1\r\n");
        assert_eq!(
            parse(&long, &limits).unwrap_err(),
            ProtoError::MaxControlLine
        );
    }

    #[test]
    fn every_split_point_is_incomplete_until_the_whole_op_arrives() {
        let input: &[u8] = b"HPUB foo.bar _INBOX.1 18 23\r\nNATS/1.0\r\nA: b\r\n\r\nhello\r\n";
        for cut in 0..input.len() {
            assert!(incomplete(&input[..cut]), "cut at {cut}");
        }
        assert_eq!(one(input).unwrap().1, input.len());
    }
}
