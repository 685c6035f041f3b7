//! Serialises conflicting writes from intent to commit, so that for any two
//! writes that touch one entity, seq order is the order Keystone applied them.
//! Keys hash onto a fixed set of reader-writer stripes; a write takes every stripe
//! it touches in index order (no deadlock), exclusively where it changes a key.
//! Writes that share no changed key run concurrently.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::keystone::touches::Touch;

const STRIPES: usize = 1024;

/// The keys of writes whose outcome is unknown, until they can no longer land
/// upstream: a write that conflicts with one is refused meanwhile (it could
/// otherwise be applied before it although logged after it).
#[derive(Default)]
pub struct InDoubt(std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>);

impl InDoubt {
    /// Holds `touches` until `until`.
    pub fn hold(&self, touches: &[Touch], until: std::time::Instant) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        map.retain(|_, (_, u)| *u > now);
        for t in touches {
            let e = map.entry(t.key.clone()).or_insert((t.exclusive, until));
            e.0 |= t.exclusive;
            e.1 = e.1.max(until);
        }
    }

    /// How long until no write in doubt conflicts with `touches` (shares a key
    /// one of the two changes); `None` when none does.
    pub fn conflict(&self, touches: &[Touch]) -> Option<std::time::Duration> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        let now = std::time::Instant::now();
        touches
            .iter()
            .filter_map(|t| {
                let (exclusive, until) = map.get(&t.key)?;
                (*until > now && (*exclusive || t.exclusive)).then(|| *until - now)
            })
            .max()
    }
}

pub struct EntityLocks {
    stripes: Vec<Arc<RwLock<()>>>,
}

/// Held for the captured section; dropping it releases every stripe.
pub struct Held {
    _guards: Vec<Guard>,
}

enum Guard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

impl Default for EntityLocks {
    fn default() -> Self {
        EntityLocks {
            stripes: (0..STRIPES).map(|_| Arc::new(RwLock::new(()))).collect(),
        }
    }
}

impl EntityLocks {
    /// Waits until no conflicting write holds any of the keys, then holds them.
    pub async fn acquire(&self, touches: &[Touch]) -> Held {
        let mut wanted: Vec<(usize, bool)> = touches
            .iter()
            .map(|t| {
                let mut h = DefaultHasher::new();
                t.key.hash(&mut h);
                ((h.finish() % STRIPES as u64) as usize, t.exclusive)
            })
            .collect();
        // One entry per stripe, exclusive if any key on it is.
        wanted.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        wanted.dedup_by_key(|w| w.0);
        let mut guards = Vec::with_capacity(wanted.len());
        for (i, exclusive) in wanted {
            let stripe = self.stripes[i].clone();
            guards.push(if exclusive {
                Guard::Exclusive(stripe.write_owned().await)
            } else {
                Guard::Shared(stripe.read_owned().await)
            });
        }
        Held { _guards: guards }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn touch(key: &str, exclusive: bool) -> Touch {
        Touch {
            key: key.into(),
            exclusive,
        }
    }

    #[tokio::test]
    async fn a_changed_key_excludes_others_and_shared_keys_do_not() {
        let locks = Arc::new(EntityLocks::default());
        let held = locks.acquire(&[touch("a", true)]).await;
        let l = locks.clone();
        let waiter = tokio::spawn(async move { l.acquire(&[touch("a", false)]).await });
        // The shared holder must wait for the exclusive one.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let _s1 = locks.acquire(&[touch("b", false)]).await;
        let _s2 = locks.acquire(&[touch("b", false)]).await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
    }
}
