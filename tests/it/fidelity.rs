//! Keystone fidelity: what an edge holds is what central holds, field for
//! field, including what Keystone derives from the caller's request.

use serde_json::{json, Value};

use crate::sync::sync_env;

/// A user, group and project created without `domain_id` by a token scoped
/// to a project of domain d1 land in d1 at central (Keystone takes the
/// token's domain); the replay, made with the edge's own service token
/// (scoped in Default), carries d1 from central's answer: they land in d1 at
/// the edge too, not in Default (where a same-named user would be adopted and
/// later get d1's user's password).
#[tokio::test]
async fn creates_scoped_by_the_callers_token_land_in_its_domain_at_the_edge() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let d1 = env
        .create("/v3/domains", "domain", json!({"domain": {"name": "d1"}}))
        .await;
    let p1 = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "p1", "domain_id": d1}}),
        )
        .await;
    let alice = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "alice", "domain_id": d1, "password": "alice-pw-1"}}),
        )
        .await;
    let admin_role = env.central_site.id_of("role", "admin").unwrap();
    let (status, _) = env
        .write(
            "PUT",
            &format!("/v3/projects/{p1}/users/{alice}/roles/{admin_role}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    // A Default user of the same name exists at both sites already.
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "bob", "password": "default-bob-1"}}),
    )
    .await;
    env.assert_in_sync().await;

    // Alice's token, scoped to p1 in d1.
    let resp = env
        .http
        .post(format!("{}/v3/auth/tokens", env.central_site.url()))
        .json(&json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "id": alice, "password": "alice-pw-1"}}},
            "scope": {"project": {"id": p1}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let token = resp.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_string();
    for (path, kind, body) in [
        (
            "/v3/users",
            "user",
            json!({"user": {"name": "bob", "password": "d1-bob-2"}}),
        ),
        ("/v3/groups", "group", json!({"group": {"name": "team"}})),
        (
            "/v3/projects",
            "project",
            json!({"project": {"name": "web"}}),
        ),
    ] {
        let resp = env
            .http
            .post(format!("{}{path}", env.proxy))
            .header("x-auth-token", &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{path}");
        let made: Value = resp.json().await.unwrap();
        assert_eq!(made[kind]["domain_id"], d1.as_str(), "{kind} at central");
    }
    env.assert_in_sync().await;
    {
        let site = &env.edges[0].site;
        let st = site.state.lock().unwrap();
        for kind in ["user", "group", "project"] {
            let name = match kind {
                "user" => "bob",
                "group" => "team",
                _ => "web",
            };
            let in_d1 = st.entities[kind]
                .values()
                .filter(|e| e["name"] == name && e["domain_id"] == d1.as_str())
                .count();
            assert_eq!(in_d1, 1, "{kind} {name} in d1 at the edge");
        }
        let default_bobs = st.entities["user"]
            .values()
            .filter(|e| e["name"] == "bob" && e["domain_id"] == "default")
            .count();
        assert_eq!(default_bobs, 1, "Default's bob is left alone");
    }
    env.shutdown().await;
}

/// A self-service password change (`POST /v3/users/{id}/password`) leaves a
/// password the user can log in with at central, where Keystone runs with
/// `change_password_upon_first_use`; replayed as sent it is as usable at the
/// edge (an admin's PATCH would leave it expired there). Where the edge's
/// current password is not central's original, an admin sets it, the site
/// marks it expired, and the audit lists the op out of sync saying so.
#[tokio::test]
async fn a_self_service_password_change_is_as_usable_at_the_edge_as_at_central() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    env.central_site
        .state
        .lock()
        .unwrap()
        .change_password_upon_first_use = true;
    env.edges[0]
        .site
        .state
        .lock()
        .unwrap()
        .change_password_upon_first_use = true;
    let carol = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "carol", "password": "first-pw-1"}}),
        )
        .await;
    env.assert_in_sync().await;
    let (status, body) = env
        .write(
            "POST",
            &format!("/v3/users/{carol}/password"),
            Some(json!({"user": {"original_password": "first-pw-1", "password": "second-pw-2"}})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    env.assert_in_sync().await;
    assert!(crate::resync::can_log_in(&env.central_site, "carol", "second-pw-2").await);
    assert!(
        crate::resync::can_log_in(&env.edges[0].site, "carol", "second-pw-2").await,
        "the new password logs in at the edge too"
    );

    // The edge's password changed behind central's back: the self-service
    // change is refused there, set by an admin, expired, and reported.
    let edge_carol = env.edges[0].site.id_of("user", "carol").unwrap();
    crate::resync::direct(
        &env,
        &env.edges[0].site,
        "PATCH",
        &format!("/v3/users/{edge_carol}"),
        json!({"user": {"password": "edge-only-pw-3"}}),
    )
    .await;
    let (status, body) = env
        .write(
            "POST",
            &format!("/v3/users/{carol}/password"),
            Some(json!({"user": {"original_password": "second-pw-2", "password": "third-pw-4"}})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    let seq = env.last_seq().await;
    assert_eq!(env.delivery(seq, "e1").await, "failed");
    let oos = env.audit("/v1/out-of-sync").await;
    let row = oos["out_of_sync"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["seq"] == seq)
        .cloned()
        .unwrap_or_default();
    assert!(
        row["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired")),
        "{oos:#}"
    );
    assert!(
        !oos.to_string().contains("third-pw-4"),
        "no secret in the audit"
    );
    env.shutdown().await;
}

/// An EC2 key is the same key at every site: the edge creates it with
/// central's access and secret, so its credential ID (the access key's
/// SHA-256) is central's too, and revoking it at central, by either API,
/// revokes it at the edge (before, the edge made a key of its own that a
/// revocation at central never reached).
#[tokio::test]
async fn an_ec2_key_is_the_same_key_at_the_edge_and_its_revocation_reaches_it() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "keyuser"}}))
        .await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "kp"}}),
        )
        .await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        let (status, made) = env
            .write(
                "POST",
                &format!("/v3/users/{u}/credentials/OS-EC2"),
                Some(json!({"tenant_id": p})),
            )
            .await;
        assert_eq!(status, 201, "{made}");
        keys.push(made["credential"]["access"].as_str().unwrap().to_string());
    }
    env.assert_in_sync().await;
    let edge_keys = |site: &crate::fake_site::FakeSite| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = site
            .unnamed("credential")
            .iter()
            .filter(|c| c["type"] == "ec2")
            .map(|c| {
                // The blob as Keystone writes it, byte for byte (a drift
                // audit names a credential by a digest of it).
                (
                    c["id"].as_str().unwrap().to_string(),
                    c["blob"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let central = edge_keys(&env.central_site);
    assert_eq!(central.len(), 2);
    assert_eq!(
        edge_keys(&env.edges[0].site),
        central,
        "the same keys, the same IDs"
    );

    // Revoked at central, one through each API: gone at the edge.
    let by_id = central
        .iter()
        .find(|(_, blob)| blob.contains(&keys[0]))
        .unwrap()
        .0
        .clone();
    let (status, _) = env
        .write("DELETE", &format!("/v3/credentials/{by_id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = env
        .write(
            "DELETE",
            &format!("/v3/users/{u}/credentials/OS-EC2/{}", keys[1]),
            None,
        )
        .await;
    assert_eq!(status, 204);
    env.assert_in_sync().await;
    assert!(
        edge_keys(&env.edges[0].site).is_empty(),
        "no key lives on at the edge"
    );
    env.shutdown().await;
}

/// A registered limit, a limit and an endpoint policy association name a
/// service: each site's catalog is its own (other IDs), so the op carries the
/// service's natural key (type and name) and the edge names its own service.
#[tokio::test]
async fn limits_name_the_edges_own_service() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "lp"}}),
        )
        .await;
    // The same service at each site, with IDs of each site's own.
    let service = json!({"service": {"type": "compute", "name": "nova"}});
    let at_central = crate::resync::direct(
        &env,
        &env.central_site,
        "POST",
        "/v3/services",
        service.clone(),
    )
    .await["service"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let at_edge = crate::resync::direct(&env, &env.edges[0].site, "POST", "/v3/services", service)
        .await["service"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(at_central, at_edge);
    let (status, body) = env
        .write(
            "POST",
            "/v3/registered_limits",
            Some(
                json!({"registered_limits": [{"service_id": at_central, "region_id": "RegionOne",
                "resource_name": "cores", "default_limit": 10}]}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = env
        .write(
            "POST",
            "/v3/limits",
            Some(
                json!({"limits": [{"service_id": at_central, "project_id": p,
                "region_id": "RegionOne", "resource_name": "cores", "resource_limit": 5}]}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    let seq = env.last_seq().await;
    for s in [seq - 1, seq] {
        assert_eq!(env.delivery(s, "e1").await, "applied", "op {s}");
    }
    let site = &env.edges[0].site;
    for kind in ["registered_limit", "limit"] {
        let items = site.unnamed(kind);
        assert_eq!(items.len(), 1, "{kind}: {items:?}");
        assert_eq!(
            items[0]["service_id"],
            at_edge.as_str(),
            "{kind} names the edge's service"
        );
    }
    env.shutdown().await;
}

/// Only references are rewritten at the edge: a password, a description, a
/// tag (in a body and in a path) and a role's name that happen to equal a
/// central ID the edge maps reach it as sent (the user logs in at the edge
/// with the password central has).
#[tokio::test]
async fn only_references_are_rewritten_never_a_value_that_looks_like_an_id() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "looks"}}),
        )
        .await;
    env.assert_in_sync().await;
    let edge_p = env.edges[0].site.id_of("project", "looks").unwrap();
    assert_ne!(p, edge_p, "the edge maps central's ID to its own");
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "hexy", "password": p, "description": p,
                        "default_project_id": p}}),
    )
    .await;
    env.create("/v3/roles", "role", json!({"role": {"name": p}}))
        .await;
    let (status, body) = env
        .write(
            "PATCH",
            &format!("/v3/projects/{p}"),
            Some(json!({"project": {"tags": [p]}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    assert!(
        crate::resync::can_log_in(site, "hexy", &p).await,
        "the password is central's, not rewritten"
    );
    {
        let st = site.state.lock().unwrap();
        let user = st.entities["user"]
            .values()
            .find(|u| u["name"] == "hexy")
            .unwrap();
        assert_eq!(user["description"], p.as_str());
        assert_eq!(
            user["default_project_id"],
            edge_p.as_str(),
            "a reference is"
        );
        assert!(st.entities["role"]
            .values()
            .any(|r| r["name"] == p.as_str()));
        assert_eq!(st.entities["project"][&edge_p]["tags"][0], p.as_str());
    }
    env.shutdown().await;
}

/// A project created with `is_domain` is a domain: logins name it by ID
/// (`user_domain_id`). It keeps central's ID at the edge (replayed through
/// the domain API, whose `explicit_domain_id` keeps it) so a login by domain
/// ID works at every site; later writes through the projects API reach it.
#[tokio::test]
async fn a_project_acting_as_a_domain_has_centrals_id_at_the_edge() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let dp = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "dp", "is_domain": true, "description": "acting",
                               "tags": ["t1"], "colour": "red"}}),
        )
        .await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "ann", "domain_id": dp, "password": "ann-pw-1"}}),
    )
    .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    {
        let st = site.state.lock().unwrap();
        let d = st.entities["domain"].get(&dp).cloned();
        assert_eq!(
            d.as_ref().map(|d| (
                d["name"].clone(),
                d["description"].clone(),
                d["tags"].clone(),
                d["colour"].clone()
            )),
            Some((json!("dp"), json!("acting"), json!(["t1"]), json!("red"))),
            "the edge's domains: {:?}",
            st.entities["domain"].values().collect::<Vec<_>>()
        );
        assert_eq!(st.creates.get("domain"), Some(&1), "made once");
    }
    let login = reqwest::Client::new()
        .post(format!("{}/v3/auth/tokens", site.url()))
        .json(
            &json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "ann", "domain": {"id": dp}, "password": "ann-pw-1"}}}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 201, "login by domain ID at the edge");

    let (status, body) = env
        .write(
            "PATCH",
            &format!("/v3/projects/{dp}"),
            Some(json!({"project": {"description": "renamed"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    env.assert_in_sync().await;
    assert_eq!(
        site.state.lock().unwrap().entities["domain"][&dp]["description"],
        "renamed"
    );
    env.shutdown().await;
}

/// An identity provider created without `domain_id` gets a domain Keystone
/// makes for it (ID and name a new UUID). The edge gets the same domain, so
/// the provider names the same domain at every site and what is then made in
/// it (a group for its users) is made at the edge too.
#[tokio::test]
async fn an_identity_providers_domain_made_by_keystone_is_the_same_at_the_edge() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let (status, made) = env
        .write(
            "PUT",
            "/v3/OS-FEDERATION/identity_providers/idp1",
            Some(json!({"identity_provider": {"enabled": true,
                                              "remote_ids": ["https://idp.example/"]}})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let domain = made["identity_provider"]["domain_id"]
        .as_str()
        .unwrap()
        .to_string();
    env.create(
        "/v3/groups",
        "group",
        json!({"group": {"name": "federated", "domain_id": domain}}),
    )
    .await;
    env.assert_in_sync().await;
    {
        let st = env.edges[0].site.state.lock().unwrap();
        assert_eq!(
            st.entities["domain"]
                .get(&domain)
                .map(|d| d["name"].clone()),
            Some(json!(domain)),
            "Keystone's domain for idp1, with its ID"
        );
        assert_eq!(st.idps["idp1"]["domain_id"], json!(domain));
        let groups: Vec<&Value> = st.entities["group"]
            .values()
            .filter(|g| g["name"] == "federated")
            .collect();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0]["domain_id"], json!(domain));
    }
    env.shutdown().await;
}

/// A domain created at central whose name the edge holds already is adopted
/// and given the create's values through the domain API: disabled and
/// described as at central, and nothing more (its `explicit_domain_id` is
/// not sent, which Keystone would keep as an attribute), reported adopted.
#[tokio::test]
async fn a_domain_the_edge_holds_already_is_adopted_with_the_creates_values() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    crate::resync::direct(
        &env,
        site,
        "POST",
        "/v3/domains",
        json!({"domain": {"name": "acme", "description": "edge's own"}}),
    )
    .await;
    env.create(
        "/v3/domains",
        "domain",
        json!({"domain": {"name": "acme", "description": "central's", "enabled": false}}),
    )
    .await;
    env.assert_in_sync().await;
    {
        let st = site.state.lock().unwrap();
        let acme: Vec<&Value> = st.entities["domain"]
            .values()
            .filter(|d| d["name"] == "acme")
            .collect();
        assert_eq!(acme.len(), 1);
        assert_eq!(
            (&acme[0]["description"], &acme[0]["enabled"]),
            (&json!("central's"), &json!(false))
        );
        // Nothing but the create's values: its ID is no attribute of the domain
        // here (Keystone keeps what an update carries beyond its fields).
        assert_eq!(acme[0].get("explicit_domain_id"), None, "{}", acme[0]);
    }
    env.shutdown().await;
}

/// An entity created by `PUT` to its URL whose create the edge answers 409
/// is adopted only if it is there (an identity provider is refused when
/// another holds its remote ID: nothing of that ID exists to adopt), and it
/// takes the create's values; one that is not there is reported failed.
#[tokio::test]
async fn an_entity_created_by_put_is_adopted_with_the_creates_values_only_if_it_is_there() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    for (idp, description, remote) in [
        ("idp1", "edge's", "https://a/"),
        ("other", "", "https://b/"),
    ] {
        crate::resync::direct(
            &env,
            site,
            "PUT",
            &format!("/v3/OS-FEDERATION/identity_providers/{idp}"),
            json!({"identity_provider": {"description": description, "enabled": false,
                                         "remote_ids": [remote], "domain_id": "default"}}),
        )
        .await;
    }
    for (idp, remote) in [("idp1", "https://a/"), ("idp2", "https://b/")] {
        let (status, body) = env
            .write(
                "PUT",
                &format!("/v3/OS-FEDERATION/identity_providers/{idp}"),
                Some(
                    json!({"identity_provider": {"description": "central's", "enabled": true,
                                                  "remote_ids": [remote], "domain_id": "default"}}),
                ),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    env.until_delivered(&["e1"], &["applied", "adopted", "failed"])
        .await;
    // Adopted (or, where the edge looks before a create it may have sent,
    // found and claimed): in sync, with the create's values.
    assert!(matches!(
        env.delivery(1, "e1").await.as_str(),
        "applied" | "adopted"
    ));
    {
        let st = site.state.lock().unwrap();
        assert_eq!(
            (&st.idps["idp1"]["description"], &st.idps["idp1"]["enabled"]),
            (&json!("central's"), &json!(true)),
            "adopted with the create's values"
        );
        assert!(!st.idps.contains_key("idp2"));
    }
    let oos = env.audit("/v1/out-of-sync").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r["seq"].as_i64(), r["state"].as_str()))
            .collect::<Vec<_>>(),
        [(Some(2), Some("failed"))],
        "idp2 is not at the edge: {oos}"
    );
    env.shutdown().await;
}

/// A federation protocol the edge holds already is adopted with the create's
/// values (its body's key is not its kind's name).
#[tokio::test]
async fn a_federation_protocol_the_edge_holds_already_takes_the_creates_values() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    let idp = "/v3/OS-FEDERATION/identity_providers/idp1";
    let protocol = format!("{idp}/protocols/saml2");
    let provider = json!({"identity_provider": {"enabled": true, "remote_ids": ["https://a/"],
                                                "domain_id": "default"}});
    crate::resync::direct(&env, site, "PUT", idp, provider.clone()).await;
    crate::resync::direct(
        &env,
        site,
        "PUT",
        &protocol,
        json!({"protocol": {"mapping_id": "edges_mapping"}}),
    )
    .await;
    let (status, body) = env.write("PUT", idp, Some(provider)).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = env
        .write(
            "PUT",
            &protocol,
            Some(json!({"protocol": {"mapping_id": "centrals_mapping"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    env.until_delivered(&["e1"], &["applied", "adopted", "failed"])
        .await;
    // Adopted (or found by the look before a create it may have sent, and
    // claimed): given the create's values either way.
    assert!(matches!(
        env.delivery(2, "e1").await.as_str(),
        "applied" | "adopted"
    ));
    let held = site.state.lock().unwrap().protocols["idp1/saml2"].clone();
    assert_eq!(
        held["mapping_id"], "centrals_mapping",
        "adopted with the create's values: {held}"
    );
    env.shutdown().await;
}

/// Creates applied at central whose answers were lost (central killed
/// meanwhile) are found when central resolves them, with what Keystone made
/// on its own: a project acting as a domain is found as the domain it is,
/// and an identity provider's domain made by Keystone reaches the edge.
#[tokio::test]
async fn lost_answers_of_creates_keystone_added_to_are_resolved_with_what_it_made() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    // A project of the same name in Default: not the one made.
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "dp"}}),
    )
    .await;
    env.assert_in_sync().await;
    env.central_site.state.lock().unwrap().hang_after_next_write = true;
    let dp = env.in_flight(
        "POST",
        "/v3/projects",
        json!({"project": {"name": "dp", "is_domain": true}}),
    );
    env.until("central's Keystone made the domain", || async {
        env.central_site.id_of("domain", "dp").is_some()
    })
    .await;
    env.central_site.state.lock().unwrap().hang_after_next_write = true;
    let idp = env.in_flight(
        "PUT",
        "/v3/OS-FEDERATION/identity_providers/idp1",
        json!({"identity_provider": {"enabled": true}}),
    );
    env.until("central's Keystone made the provider", || async {
        env.central_site
            .state
            .lock()
            .unwrap()
            .idps
            .contains_key("idp1")
    })
    .await;
    env.kill_central_and_restart().await;
    for t in [dp, idp] {
        let _ = t.await;
    }
    env.assert_in_sync().await;
    let central_dp = env.central_site.id_of("domain", "dp").unwrap();
    {
        let st = env.edges[0].site.state.lock().unwrap();
        assert!(
            st.entities["domain"].contains_key(&central_dp),
            "the domain, with central's ID"
        );
        let domain = env.central_site.state.lock().unwrap().idps["idp1"]["domain_id"].clone();
        assert_eq!(st.idps["idp1"]["domain_id"], domain);
    }
    env.shutdown().await;
}

/// A user created at central whose name the edge holds already is adopted
/// and takes the create's values: disabled as at central, with central's
/// password (not the edge's own, which would still log in).
#[tokio::test]
async fn a_user_the_edge_holds_already_takes_the_creates_values_when_adopted() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    crate::resync::direct(
        &env,
        site,
        "POST",
        "/v3/users",
        json!({"user": {"name": "alice", "password": "edge-own-pw-1", "email": "old@edge"}}),
    )
    .await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "alice", "enabled": false, "password": "central-pw-1",
                        "email": "alice@central"}}),
    )
    .await;
    env.assert_in_sync().await;
    let alice = site.id_of("user", "alice").unwrap();
    {
        let st = site.state.lock().unwrap();
        let user = &st.entities["user"][&alice];
        assert_eq!(
            (&user["enabled"], &user["email"]),
            (&json!(false), &json!("alice@central"))
        );
        assert_eq!(
            st.passwords.get(&alice).map(String::as_str),
            Some("central-pw-1")
        );
        assert_eq!(st.creates.get("user"), Some(&1), "no second alice");
    }
    env.shutdown().await;
}
