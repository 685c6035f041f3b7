//! Many edges on one central, in one process: correctness at a fleet's
//! scale, not speed (`scripts/bench.sh` measures that).

use std::time::Duration;

use crate::sync::{full_scenario, sync_env};

/// Edges in the fleet test.
const EDGES: usize = 200;

/// Two hundred edges, each with its own Keystone, get every kind of write
/// central captures (`full_scenario` checks each site's state and logins):
/// each site's Keystone received one create per entity central created,
/// none twice, and the audit says every edge is online at the last op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_edges_each_end_equal_to_central() {
    let names: Vec<String> = (0..EDGES).map(|i| format!("site{i:03}")).collect();
    let declared = names.clone();
    let mut env = sync_env(&[], None, |c| c.sync.edges = declared).await;
    // A fleet's hellos at a fleet's pace, not a unit test's.
    env.hello_interval = Duration::from_secs(2);
    for name in &names {
        env.add_edge(name, None).await;
    }
    full_scenario(&env).await;
    let journal = env.central_site.state.lock().unwrap().journal.clone();
    for collection in ["domains", "projects", "users", "groups", "roles"] {
        let made = journal
            .iter()
            .filter(|l| l.starts_with(&format!("POST /v3/{collection} 201")))
            .count();
        assert!(made > 0, "the scenario creates {collection}");
        for e in &env.edges {
            assert_eq!(
                e.site.create_requests(collection),
                made,
                "{}: one create per {collection} made at central",
                e.id
            );
        }
    }
    env.assert_every_edge_at_the_last_op().await;
    let oos = env.audit("/v1/out-of-sync").await;
    assert_eq!(
        oos["out_of_sync"],
        serde_json::json!([]),
        "nothing out of sync"
    );
    env.shutdown().await;
}
