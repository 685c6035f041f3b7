//! Subject matching: a trie of subject tokens with `*` (one token) and `>` (one
//! or more trailing tokens) children, plus a cache of match results keyed by the
//! published subject. The cache is emptied on every subscribe and unsubscribe, so
//! a publish to a hot subject costs one hash lookup and no trie walk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Most subjects whose results are kept; past this the cache starts over.
const CACHE_MAX: usize = 4096;

/// Whether `subject` is valid for a subscription: no empty tokens, no
/// whitespace, `*` and `>` only as whole tokens, `>` only last.
pub fn is_valid_subject(subject: &[u8]) -> bool {
    if subject.is_empty() {
        return false;
    }
    let mut saw_fwc = false;
    for token in subject.split(|&b| b == b'.') {
        if token.is_empty() || saw_fwc {
            return false;
        }
        if token
            .iter()
            .any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'\x0c'))
        {
            return false;
        }
        if token == b">" {
            saw_fwc = true;
        }
    }
    true
}

/// Whether `subject` is a valid subject without wildcards (for publishing).
pub fn is_valid_literal_subject(subject: &[u8]) -> bool {
    is_valid_subject(subject)
        && subject
            .split(|&b| b == b'.')
            .all(|t| t != b"*" && t != b">")
}

/// Whether a subscription subject (wildcards allowed) matches a literal subject.
pub fn subject_matches(pattern: &[u8], subject: &[u8]) -> bool {
    let mut p = pattern.split(|&b| b == b'.');
    let mut s = subject.split(|&b| b == b'.');
    loop {
        match (p.next(), s.next()) {
            (Some(b">"), Some(_)) => return true,
            (Some(b"*"), Some(_)) => {}
            (Some(pt), Some(st)) if pt == st => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subscriptions a subject matches: plain ones, and each queue group's members.
#[derive(Debug)]
pub struct Matches<T> {
    pub plain: Vec<T>,
    pub groups: Vec<Vec<T>>,
}

impl<T> Matches<T> {
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

#[derive(Debug)]
struct Node<T> {
    literal: HashMap<Box<[u8]>, Node<T>>,
    pwc: Option<Box<Node<T>>>,
    fwc: Option<Box<Node<T>>>,
    plain: Vec<T>,
    groups: Vec<(Box<[u8]>, Vec<T>)>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            pwc: None,
            fwc: None,
            plain: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.pwc.is_none()
            && self.fwc.is_none()
            && self.plain.is_empty()
            && self.groups.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject")]
pub struct InvalidSubject;

/// A subscription index. `T` is a cheap handle compared by identity.
pub struct Sublist<T> {
    root: RwLock<(Node<T>, usize)>,
    /// Match results by subject, and the generation of the trie they were
    /// computed from; every change bumps the generation while the trie is
    /// write-locked, so a result computed before a change is never cached after it.
    cache: Mutex<Cache<T>>,
}

struct Cache<T> {
    generation: u64,
    results: HashMap<Box<[u8]>, Arc<Matches<T>>>,
}

impl<T: Clone + PartialEq> Default for Sublist<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + PartialEq> Sublist<T> {
    pub fn new() -> Self {
        Sublist {
            root: RwLock::new((Node::default(), 0)),
            cache: Mutex::new(Cache {
                generation: 0,
                results: HashMap::new(),
            }),
        }
    }

    /// Number of subscriptions held.
    pub fn len(&self) -> usize {
        self.root.read().unwrap_or_else(|e| e.into_inner()).1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(
        &self,
        subject: &[u8],
        queue: Option<&[u8]>,
        sub: T,
    ) -> Result<(), InvalidSubject> {
        if !is_valid_subject(subject) || queue.is_some_and(|q| q.is_empty()) {
            return Err(InvalidSubject);
        }
        {
            let mut guard = self.root.write().unwrap_or_else(|e| e.into_inner());
            let mut node = &mut guard.0;
            for token in subject.split(|&b| b == b'.') {
                node = match token {
                    b"*" => node.pwc.get_or_insert_with(Default::default),
                    b">" => node.fwc.get_or_insert_with(Default::default),
                    t => node.literal.entry(t.into()).or_default(),
                };
            }
            match queue {
                None => node.plain.push(sub),
                Some(q) => match node.groups.iter_mut().find(|(name, _)| &name[..] == q) {
                    Some((_, members)) => members.push(sub),
                    None => node.groups.push((q.into(), vec![sub])),
                },
            }
            guard.1 += 1;
            self.invalidate();
        }
        Ok(())
    }

    /// Removes one subscription; returns whether it was there.
    pub fn remove(&self, subject: &[u8], queue: Option<&[u8]>, sub: &T) -> bool {
        let removed = {
            let mut guard = self.root.write().unwrap_or_else(|e| e.into_inner());
            let tokens: Vec<&[u8]> = subject.split(|&b| b == b'.').collect();
            let removed = remove_at(&mut guard.0, &tokens, queue, sub);
            if removed {
                guard.1 -= 1;
                self.invalidate();
            }
            removed
        };
        removed
    }

    /// The subscriptions matching a published subject.
    pub fn matches(&self, subject: &[u8]) -> Arc<Matches<T>> {
        if let Some(hit) = self.lock_cache().results.get(subject) {
            return hit.clone();
        }
        let mut result = Matches {
            plain: Vec::new(),
            groups: Vec::new(),
        };
        let generation = {
            let guard = self.root.read().unwrap_or_else(|e| e.into_inner());
            let tokens: Vec<&[u8]> = subject.split(|&b| b == b'.').collect();
            if !tokens.iter().any(|t| t.is_empty()) {
                collect(&guard.0, &tokens, &mut result);
            }
            self.lock_cache().generation
        };
        let result = Arc::new(result);
        let mut cache = self.lock_cache();
        if cache.generation == generation {
            if cache.results.len() >= CACHE_MAX {
                cache.results.clear();
            }
            cache.results.insert(subject.into(), result.clone());
        }
        result
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache<T>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call with the trie write-locked.
    fn invalidate(&self) {
        let mut cache = self.lock_cache();
        cache.generation += 1;
        cache.results.clear();
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.lock_cache().results.len()
    }
}

fn add_node<T: Clone>(node: &Node<T>, out: &mut Matches<T>) {
    out.plain.extend(node.plain.iter().cloned());
    for (_, members) in &node.groups {
        out.groups.push(members.clone());
    }
}

fn collect<T: Clone>(node: &Node<T>, tokens: &[&[u8]], out: &mut Matches<T>) {
    let Some((first, rest)) = tokens.split_first() else {
        add_node(node, out);
        return;
    };
    if let Some(fwc) = &node.fwc {
        add_node(fwc, out);
    }
    if let Some(pwc) = &node.pwc {
        collect(pwc, rest, out);
    }
    if let Some(child) = node.literal.get(*first) {
        collect(child, rest, out);
    }
}

fn remove_at<T: PartialEq>(
    node: &mut Node<T>,
    tokens: &[&[u8]],
    queue: Option<&[u8]>,
    sub: &T,
) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return match queue {
            None => take(&mut node.plain, sub),
            Some(q) => {
                let Some(i) = node.groups.iter().position(|(name, _)| &name[..] == q) else {
                    return false;
                };
                let removed = take(&mut node.groups[i].1, sub);
                if node.groups[i].1.is_empty() {
                    node.groups.swap_remove(i);
                }
                removed
            }
        };
    };
    // Walk down, remove, and prune children left empty.
    match *first {
        b"*" => prune_box(&mut node.pwc, rest, queue, sub),
        b">" => prune_box(&mut node.fwc, rest, queue, sub),
        t => {
            let Some(child) = node.literal.get_mut(t) else {
                return false;
            };
            let removed = remove_at(child, rest, queue, sub);
            if child.is_empty() {
                node.literal.remove(t);
            }
            removed
        }
    }
}

fn prune_box<T: PartialEq>(
    slot: &mut Option<Box<Node<T>>>,
    rest: &[&[u8]],
    queue: Option<&[u8]>,
    sub: &T,
) -> bool {
    let Some(child) = slot.as_mut() else {
        return false;
    };
    let removed = remove_at(child, rest, queue, sub);
    if child.is_empty() {
        *slot = None;
    }
    removed
}

fn take<T: PartialEq>(list: &mut Vec<T>, sub: &T) -> bool {
    match list.iter().position(|s| s == sub) {
        Some(i) => {
            list.swap_remove(i);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(sl: &Sublist<u32>, subject: &str) -> Vec<u32> {
        let mut v = sl.matches(subject.as_bytes()).plain.clone();
        v.sort();
        v
    }

    #[test]
    fn subject_validation() {
        for ok in [
            "foo",
            "foo.bar",
            "foo.*",
            "*.bar",
            ">",
            "foo.>",
            "foo.*.>",
            "a*b.c",
            "_INBOX.x.*",
        ] {
            assert!(is_valid_subject(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "foo.",
            ".foo",
            "foo..bar",
            "foo.>.bar",
            ">.foo",
            "foo bar",
            "foo\tbar",
        ] {
            assert!(!is_valid_subject(bad.as_bytes()), "{bad:?}");
        }
        assert!(is_valid_literal_subject(b"foo.bar"));
        assert!(is_valid_literal_subject(b"a*b"));
        assert!(!is_valid_literal_subject(b"foo.*"));
        assert!(!is_valid_literal_subject(b"foo.>"));
    }

    #[test]
    fn single_pattern_matching() {
        assert!(subject_matches(b"_INBOX.abc.*", b"_INBOX.abc.1"));
        assert!(subject_matches(b"a.>", b"a.b.c"));
        assert!(!subject_matches(b"a.>", b"a"));
        assert!(!subject_matches(b"a.*", b"a.b.c"));
        assert!(subject_matches(b"a.b", b"a.b"));
        assert!(!subject_matches(b"a.b", b"a.c"));
    }

    #[test]
    fn wildcards_match_as_nats_defines() {
        let sl = Sublist::new();
        sl.insert(b"foo.bar", None, 1).unwrap();
        sl.insert(b"foo.*", None, 2).unwrap();
        sl.insert(b"foo.>", None, 3).unwrap();
        sl.insert(b">", None, 4).unwrap();
        sl.insert(b"*.bar", None, 5).unwrap();
        sl.insert(b"foo.*.baz", None, 6).unwrap();
        assert_eq!(plain(&sl, "foo.bar"), [1, 2, 3, 4, 5]);
        assert_eq!(plain(&sl, "foo"), [4]);
        assert_eq!(plain(&sl, "foo.x.baz"), [3, 4, 6]);
        assert_eq!(plain(&sl, "foo.x.y"), [3, 4]);
        assert_eq!(plain(&sl, "bar"), [4]);
        assert!(sl.matches(b"foo..bar").is_empty());
        assert_eq!(sl.len(), 6);
    }

    #[test]
    fn queue_groups_are_returned_per_group() {
        let sl = Sublist::new();
        sl.insert(b"q", Some(b"g1"), 1).unwrap();
        sl.insert(b"q", Some(b"g1"), 2).unwrap();
        sl.insert(b"q", Some(b"g2"), 3).unwrap();
        sl.insert(b"q", None, 4).unwrap();
        let m = sl.matches(b"q");
        assert_eq!(m.plain, [4]);
        let mut groups: Vec<Vec<u32>> = m.groups.clone();
        groups.iter_mut().for_each(|g| g.sort());
        groups.sort();
        assert_eq!(groups, [vec![1, 2], vec![3]]);
    }

    #[test]
    fn cache_is_used_and_invalidated_on_change() {
        let sl = Sublist::new();
        sl.insert(b"a.*", None, 1).unwrap();
        let first = sl.matches(b"a.b");
        let second = sl.matches(b"a.b");
        assert!(
            Arc::ptr_eq(&first, &second),
            "second publish is served from the cache"
        );
        assert_eq!(sl.cached(), 1);
        sl.insert(b"a.b", None, 2).unwrap();
        assert_eq!(sl.cached(), 0);
        assert_eq!(plain(&sl, "a.b"), [1, 2]);
        assert!(sl.remove(b"a.*", None, &1));
        assert_eq!(plain(&sl, "a.b"), [2]);
        assert!(!sl.remove(b"a.*", None, &1));
    }

    #[test]
    fn removal_prunes_empty_nodes() {
        let sl = Sublist::new();
        sl.insert(b"a.b.c", None, 1).unwrap();
        sl.insert(b"a.*.>", Some(b"g"), 2).unwrap();
        assert!(sl.remove(b"a.b.c", None, &1));
        assert!(sl.remove(b"a.*.>", Some(b"g"), &2));
        assert!(sl.is_empty());
        assert!(sl.root.read().unwrap().0.is_empty());
    }

    #[test]
    fn invalid_subjects_are_refused() {
        let sl: Sublist<u32> = Sublist::new();
        assert_eq!(sl.insert(b"foo..bar", None, 1), Err(InvalidSubject));
        assert_eq!(sl.insert(b"foo.>.bar", None, 1), Err(InvalidSubject));
        assert!(sl.is_empty());
    }
}
