//! Tasks that end with the process part that spawned them, as a process's
//! threads end with it: dropping a `Scope` (held by a role's `run`, whether it
//! returns or is dropped mid-way) ends every task spawned through its
//! `Spawner`. Work that must outlive a client's request (a capture) runs on
//! such a task; a kill of the role ends it, so tests can kill in process.

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Owns the tasks spawned through its spawners.
pub struct Scope(#[allow(dead_code)] watch::Sender<()>);

/// Spawns tasks that end when their scope is dropped.
#[derive(Clone, Debug)]
pub struct Spawner(watch::Receiver<()>);

impl Scope {
    pub fn new() -> (Scope, Spawner) {
        let (tx, rx) = watch::channel(());
        (Scope(tx), Spawner(rx))
    }
}

impl Spawner {
    /// Spawns `task`; it yields `None` if the scope ended first.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut gone = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                out = task => Some(out),
                _ = gone.changed() => None,
            }
        })
    }

    /// A spawner whose scope never ends (tests, tools).
    pub fn detached() -> Spawner {
        let (scope, spawner) = Scope::new();
        std::mem::forget(scope);
        spawner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_end_with_their_scope() {
        let (scope, spawner) = Scope::new();
        let forever = spawner.spawn(std::future::pending::<()>());
        let quick = spawner.spawn(async { 7 });
        assert_eq!(quick.await.unwrap(), Some(7));
        drop(scope);
        assert_eq!(forever.await.unwrap(), None);
    }
}
