//! Replaces the upstream's own base URL with the gateway's public URL in response
//! bodies, chunk by chunk, so that links and the service catalog keep clients on
//! the gateway without buffering a whole response.

use bytes::{Bytes, BytesMut};

/// A streaming find-and-replace of one URL prefix. A match counts only where the
/// URL ends: the next byte cannot continue a host, port or path segment name
/// (`http://keystone:5000` must not rewrite `http://keystone:50001`).
#[derive(Debug, Clone)]
pub struct UrlRewriter {
    from: Vec<u8>,
    to: Vec<u8>,
    carry: BytesMut,
}

fn continues_url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_')
}

impl UrlRewriter {
    /// `from` and `to` are base URLs; a trailing `/` is ignored on both.
    pub fn new(from: &str, to: &str) -> UrlRewriter {
        UrlRewriter {
            from: from.trim_end_matches('/').as_bytes().to_vec(),
            to: to.trim_end_matches('/').as_bytes().to_vec(),
            carry: BytesMut::new(),
        }
    }

    /// Feeds one chunk; returns what can be sent now. Bytes that could still be
    /// the start of a match are held back until the next chunk or `finish`.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        self.process(false)
    }

    /// Flushes what was held back at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        self.process(true)
    }

    fn process(&mut self, eof: bool) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        let mut out = BytesMut::with_capacity(buf.len());
        let first = self.from[0];
        let mut i = 0;
        while i < buf.len() {
            let Some(offset) = buf[i..].iter().position(|&b| b == first) else {
                out.extend_from_slice(&buf[i..]);
                i = buf.len();
                break;
            };
            out.extend_from_slice(&buf[i..i + offset]);
            i += offset;
            let rest = &buf[i..];
            if rest.len() <= self.from.len() && !eof && self.from.starts_with(rest) {
                // A possible match cut by the chunk boundary (or one whose
                // following byte is not here yet): wait for more.
                break;
            }
            if rest.starts_with(&self.from) {
                let end = i + self.from.len();
                match buf.get(end) {
                    Some(&next) if continues_url(next) => {}
                    _ => {
                        out.extend_from_slice(&self.to);
                        i = end;
                        continue;
                    }
                }
            }
            out.extend_from_slice(&buf[i..i + 1]);
            i += 1;
        }
        self.carry.extend_from_slice(&buf[i..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite_in_chunks(input: &str, size: usize) -> String {
        let mut r = UrlRewriter::new("http://ks:5000/", "https://gw.example");
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(size) {
            out.extend_from_slice(&r.push(chunk));
        }
        out.extend_from_slice(&r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn replaces_across_every_chunk_boundary() {
        let input = r#"{"links": {"self": "http://ks:5000/v3/users/1"}, "url": "http://ks:5000", "x": "http://ks:50001/v3", "y": "http://ks:5000"#;
        let expected = r#"{"links": {"self": "https://gw.example/v3/users/1"}, "url": "https://gw.example", "x": "http://ks:50001/v3", "y": "https://gw.example"#;
        for size in 1..=input.len() {
            assert_eq!(
                rewrite_in_chunks(input, size),
                expected,
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn leaves_other_text_alone() {
        let input = "hhhttp://ks:500 http://ks:5000.evil h";
        for size in 1..=input.len() {
            assert_eq!(rewrite_in_chunks(input, size), input, "chunk size {size}");
        }
    }
}
