//! Store tests against a real SQLite file in a temp dir.

use std::path::PathBuf;
use std::sync::Arc;

use nimbus_core::manifest::parse_manifest;
use nimbus_core::routes::RouteEntry;
use nimbus_core::{AuthKind, FunctionConfig, Target};

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Store,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nimbus.db");
    let store = Store::open(&path).expect("open store");
    Fixture {
        _dir: dir,
        path,
        store,
    }
}

/// A validated config for `name` with the given routes (`"GET /x"` each).
fn config(name: &str, routes: &[&str]) -> FunctionConfig {
    let mut text =
        format!("name = \"{name}\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n");
    for route in routes {
        let (method, path) = route.split_once(' ').expect("route spec");
        text.push_str(&format!(
            "[[http]]\nmethod = \"{method}\"\npath = \"{path}\"\n"
        ));
    }
    parse_manifest("nimbus.toml", &text).expect("valid manifest")
}

fn versions_of(store: &Store, name: &str) -> Vec<u32> {
    store
        .list_versions(name)
        .expect("list versions")
        .iter()
        .map(|v| v.version)
        .collect()
}

#[test]
fn store_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn synchronous_is_full_and_wal_is_on() {
    let f = fixture();
    let conn = f.store.lock();
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("read synchronous");
    assert_eq!(sync, 2);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("read journal_mode");
    assert_eq!(mode, "wal");
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .expect("read foreign_keys");
    assert_eq!(fk, 1);
}

#[test]
fn durability_check_refuses_normal() {
    let conn = Connection::open_in_memory().expect("open");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("set NORMAL");
    let err = check_synchronous(&conn).expect_err("NORMAL is not durable");
    assert!(matches!(err, Error::Durability { found: 1 }), "{err}");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("set FULL");
    check_synchronous(&conn).expect("FULL is accepted");
}

#[test]
fn deploy_twice_unchanged_makes_one_version() {
    let f = fixture();
    let cfg = config("hello", &["GET /hello/{name}"]);
    let first = f.store.deploy("sha256:aaa", 10, &cfg).expect("deploy 1");
    assert!(first.created);
    assert_eq!(first.version.version, 1);
    let mut feed = f.store.subscribe();
    feed.mark_unchanged();
    let second = f.store.deploy("sha256:aaa", 10, &cfg).expect("deploy 2");
    assert!(!second.created);
    assert_eq!(second.version.version, 1);
    assert_eq!(second.version.config, cfg);
    assert_eq!(versions_of(&f.store, "hello"), vec![1]);
    assert!(
        !feed.has_changed().expect("sender alive"),
        "an unchanged deploy must not wake the gateway"
    );
}

#[test]
fn changed_config_or_code_makes_new_version_and_moves_live() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 10, &config("hello", &[]))
        .expect("deploy 1");
    let mut cfg = config("hello", &[]);
    cfg.env.insert("GREETING".into(), "hi".into());
    let second = f.store.deploy("sha256:aaa", 10, &cfg).expect("deploy 2");
    assert!(second.created);
    assert_eq!(second.version.version, 2);
    let third = f.store.deploy("sha256:bbb", 11, &cfg).expect("deploy 3");
    assert_eq!(third.version.version, 3);

    let func = f.store.get_function("hello").expect("get").expect("exists");
    assert_eq!(func.latest_version, 3);
    assert_eq!(func.live_version, Some(3));
    let live = f
        .store
        .resolve("hello", &Target::Alias("live".into()))
        .expect("resolve")
        .expect("live exists");
    assert_eq!(live.version, 3);
    assert_eq!(live.digest, "sha256:bbb");
    assert_eq!(live.size, 11);
    assert_eq!(
        live.config.env.get("GREETING").map(String::as_str),
        Some("hi")
    );
    let v1 = f
        .store
        .resolve("hello", &Target::Version(1))
        .expect("resolve")
        .expect("v1 exists");
    assert!(v1.config.env.is_empty());
    assert!(
        f.store
            .resolve("hello", &Target::Alias("beta".into()))
            .expect("resolve")
            .is_none()
    );
}

#[test]
fn rollback_moves_down_then_conflicts_at_oldest() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy 1");
    f.store
        .deploy("sha256:bbb", 1, &config("hello", &[]))
        .expect("deploy 2");
    assert_eq!(f.store.rollback("hello", "live").expect("rollback"), (2, 1));
    let func = f.store.get_function("hello").expect("get").expect("exists");
    assert_eq!(func.live_version, Some(1));
    assert_eq!(func.latest_version, 2);
    let err = f.store.rollback("hello", "live").expect_err("at oldest");
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "`live` is already at the oldest version (1)"
    );

    let err = f.store.rollback("nope", "live").expect_err("no function");
    assert_eq!(err.to_string(), "function `nope` not found");

    // Redeploying the latest code after a rollback makes it live again, with no new
    // version, and wakes the change feed.
    let mut feed = f.store.subscribe();
    feed.borrow_and_update();
    let again = f
        .store
        .deploy("sha256:bbb", 1, &config("hello", &[]))
        .expect("redeploy");
    assert!(!again.created);
    assert_eq!(again.version.version, 2);
    let func = f.store.get_function("hello").expect("get").expect("exists");
    assert_eq!(func.live_version, Some(2));
    assert!(feed.has_changed().expect("feed open"));
    f.store.rollback("hello", "live").expect("rollback again");
    let err = f.store.rollback("hello", "beta").expect_err("no alias");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn rollback_skips_to_highest_lower_version() {
    let f = fixture();
    for digest in ["sha256:a", "sha256:b", "sha256:c"] {
        f.store
            .deploy(digest, 1, &config("hello", &[]))
            .expect("deploy");
    }
    // A user alias at 3 goes to 2, not to 1.
    f.store.set_alias("hello", "beta", 3).expect("set beta");
    assert_eq!(f.store.rollback("hello", "beta").expect("rollback"), (3, 2));
    // `live` is untouched by another alias's rollback.
    let func = f.store.get_function("hello").expect("get").expect("exists");
    assert_eq!(func.live_version, Some(3));
}

#[test]
fn set_alias_validates_and_names_what_is_missing() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy");
    let err = f.store.set_alias("hello", "beta", 9).expect_err("no v9");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(err.to_string(), "version 9 of `hello` not found");
    let err = f
        .store
        .set_alias("nope", "beta", 1)
        .expect_err("no function");
    assert_eq!(err.to_string(), "function `nope` not found");
    for bad in ["", "123", "Beta", "a b", "a/b", &"x".repeat(65)] {
        let err = f.store.set_alias("hello", bad, 1).expect_err(bad);
        assert!(matches!(err, Error::Invalid(_)), "{bad}: {err}");
    }
    let row = f.store.set_alias("hello", "beta-2", 1).expect("set alias");
    assert_eq!((row.name.as_str(), row.version), ("beta-2", 1));
    let aliases: Vec<(String, u32)> = f
        .store
        .list_aliases("hello")
        .expect("list")
        .into_iter()
        .map(|a| (a.name, a.version))
        .collect();
    assert_eq!(aliases, vec![("beta-2".into(), 1), ("live".into(), 1)]);
}

#[test]
fn route_conflict_rolls_back_whole_deploy() {
    let f = fixture();
    f.store
        .deploy(
            "sha256:aaa",
            1,
            &config("a", &["GET /items/{id}", "POST /items"]),
        )
        .expect("deploy a");
    let mut feed = f.store.subscribe();
    feed.mark_unchanged();

    let err = f
        .store
        .deploy("sha256:bbb", 1, &config("b", &["GET /items/{key}"]))
        .expect_err("conflict");
    let Error::RouteConflict(conflict) = &err else {
        panic!("expected RouteConflict, got {err}");
    };
    assert_eq!(conflict.new_function, "b");
    assert_eq!(conflict.existing_function, "a");
    assert!(f.store.get_function("b").expect("get").is_none());
    assert!(f.store.list_versions("b").expect("list").is_empty());
    assert_eq!(
        f.store.digests_in_use().expect("digests"),
        vec!["sha256:aaa"]
    );
    let keys: Vec<String> = f
        .store
        .routes()
        .expect("routes")
        .iter()
        .map(RouteEntry::route_key)
        .collect();
    assert_eq!(keys, vec!["POST /items", "GET /items/{id}"]);
    assert!(!feed.has_changed().expect("sender alive"));

    // A conflicting redeploy of an existing function keeps its previous version live.
    f.store
        .deploy("sha256:bbb", 1, &config("b", &["GET /other"]))
        .expect("deploy b");
    let err = f
        .store
        .deploy("sha256:ccc", 1, &config("b", &["GET /items/{x}"]))
        .expect_err("conflict");
    assert!(matches!(err, Error::RouteConflict(_)), "{err}");
    assert_eq!(versions_of(&f.store, "b"), vec![1]);
    assert_eq!(
        f.store.function_routes("b").expect("routes")[0].path,
        "/other"
    );
}

#[test]
fn redeploy_replaces_manifest_routes_but_keeps_api_routes() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("a", &["GET /one", "GET /two"]))
        .expect("deploy 1");
    f.store
        .add_route(&RouteEntry {
            method: "ANY".into(),
            path: "/extra/{rest+}".into(),
            function: "a".into(),
            alias: "live".into(),
            host: String::new(),
            upstream: Vec::new(),
            auth: AuthKind::ApiKey,
            options: nimbus_core::route_options::RouteOptions {
                rate: nimbus_core::keys::parse_rate("5/s").ok(),
                ..Default::default()
            },
        })
        .expect("add api route");
    f.store
        .deploy("sha256:aaa", 1, &config("a", &["GET /two", "GET /three"]))
        .expect("deploy 2");
    let routes = f.store.routes().expect("routes");
    let keys: Vec<String> = routes.iter().map(RouteEntry::route_key).collect();
    assert_eq!(keys, vec!["ANY /extra/{rest+}", "GET /three", "GET /two"]);
    assert_eq!(routes[0].auth, AuthKind::ApiKey);
    assert_eq!(
        routes[0].options.rate.map(|r| r.requests),
        Some(5),
        "options round-trip"
    );
    assert!(routes[1].options.is_empty());
    assert!(RouteTable::build(routes).is_ok());

    let err = f
        .store
        .remove_route("", "GET", "/two")
        .expect_err("manifest");
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let removed = f
        .store
        .remove_route("", "ANY", "/extra/{rest+}")
        .expect("remove api route");
    assert_eq!(removed.function, "a");
    let err = f
        .store
        .remove_route("", "ANY", "/extra/{rest+}")
        .expect_err("gone");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn add_route_checks_alias_and_conflicts() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("a", &["GET /one"]))
        .expect("deploy");
    let mut route = RouteEntry {
        method: "GET".into(),
        path: "/beta".into(),
        function: "a".into(),
        alias: "beta".into(),
        host: String::new(),
        upstream: Vec::new(),
        auth: AuthKind::None,
        options: Default::default(),
    };
    let err = f.store.add_route(&route).expect_err("no alias");
    assert_eq!(err.to_string(), "alias `beta` of `a` not found");
    route.alias = "live".into();
    route.path = "/one".into();
    let err = f.store.add_route(&route).expect_err("conflict");
    assert!(matches!(err, Error::RouteConflict(_)), "{err}");
    route.path = "/v1/x".into();
    let err = f.store.add_route(&route).expect_err("reserved");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[test]
fn upstream_routes_need_no_function_and_hosts_are_part_of_the_key() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("a", &["GET /one"]))
        .expect("deploy");
    let up = |host: &str| RouteEntry {
        method: "GET".into(),
        path: "/one".into(),
        function: String::new(),
        alias: String::new(),
        host: host.into(),
        upstream: vec!["http://127.0.0.1:9001".into()],
        auth: AuthKind::None,
        options: Default::default(),
    };
    let err = f.store.add_route(&up("")).expect_err("same host and path");
    assert!(matches!(err, Error::RouteConflict(_)), "{err}");
    f.store.add_route(&up("a.test")).expect("other host");
    f.store.add_route(&up("*.b.test")).expect("wildcard host");
    let err = f
        .store
        .add_route(&up("A.test"))
        .expect_err("upper-case host");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let mut bad = up("b.test");
    bad.upstream = vec!["http://u:p@x".into()];
    assert!(matches!(f.store.add_route(&bad), Err(Error::Invalid(_))));
    bad.upstream.clear();
    assert!(matches!(f.store.add_route(&bad), Err(Error::Invalid(_))));

    let routes = f.store.routes().expect("routes");
    let keys: Vec<String> = routes.iter().map(RouteEntry::route_key).collect();
    assert_eq!(keys, vec!["GET /one", "GET *.b.test/one", "GET a.test/one"]);
    assert_eq!(routes[2].upstream, vec!["http://127.0.0.1:9001"]);
    assert!(routes[2].function.is_empty());

    let removed = f.store.remove_route("a.test", "GET", "/one").expect("rm");
    assert_eq!(removed.host, "a.test");
    assert_eq!(f.store.routes().expect("routes").len(), 2);
    // Deleting the function leaves the routes no function owns.
    f.store.delete_function("a").expect("delete");
    let left = f.store.routes().expect("routes");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].host, "*.b.test");
}

#[test]
fn delete_returns_only_unreferenced_digests() {
    let f = fixture();
    f.store
        .deploy("sha256:shared", 1, &config("a", &["GET /a"]))
        .expect("a v1");
    f.store
        .deploy("sha256:only-a", 1, &config("a", &["GET /a"]))
        .expect("a v2");
    f.store
        .deploy("sha256:shared", 1, &config("b", &["GET /b"]))
        .expect("b v1");
    f.store.set_alias("a", "beta", 1).expect("alias");

    let gone = f.store.delete_function("a").expect("delete a");
    assert_eq!(gone, vec!["sha256:only-a"]);
    assert!(f.store.get_function("a").expect("get").is_none());
    assert!(f.store.list_versions("a").expect("versions").is_empty());
    assert!(f.store.list_aliases("a").expect("aliases").is_empty());
    let keys: Vec<String> = f
        .store
        .routes()
        .expect("routes")
        .iter()
        .map(RouteEntry::route_key)
        .collect();
    assert_eq!(keys, vec!["GET /b"]);
    assert_eq!(
        f.store.digests_in_use().expect("digests"),
        vec!["sha256:shared"]
    );

    let err = f.store.delete_function("a").expect_err("already gone");
    assert_eq!(err.to_string(), "function `a` not found");
    assert_eq!(
        f.store.delete_function("b").expect("delete b"),
        vec!["sha256:shared"]
    );

    // A recreated function starts again at version 1.
    let again = f
        .store
        .deploy("sha256:new", 1, &config("a", &[]))
        .expect("recreate");
    assert_eq!(again.version.version, 1);
}

#[test]
fn everything_survives_reopen() {
    let f = fixture();
    let mut cfg = config("hello", &["GET /hello/{name}"]);
    f.store.deploy("sha256:aaa", 42, &cfg).expect("deploy 1");
    cfg.memory_mb = 256;
    f.store.deploy("sha256:bbb", 43, &cfg).expect("deploy 2");
    f.store.set_alias("hello", "beta", 1).expect("alias");
    f.store.rollback("hello", "live").expect("rollback");
    let before = (
        f.store.list_functions().expect("functions"),
        f.store.list_versions("hello").expect("versions"),
        f.store.list_aliases("hello").expect("aliases"),
        f.store.routes().expect("routes"),
    );
    let Fixture { _dir, path, store } = f;
    drop(store);

    let reopened = Store::open(&path).expect("reopen");
    let after = (
        reopened.list_functions().expect("functions"),
        reopened.list_versions("hello").expect("versions"),
        reopened.list_aliases("hello").expect("aliases"),
        reopened.routes().expect("routes"),
    );
    assert_eq!(before, after);
    assert_eq!(after.1[1].config.memory_mb, 256);
    assert_eq!(after.0[0].live_version, Some(1));
    assert_eq!(after.0[0].latest_version, 2);
    // The deploy after reopen still sees the latest version as unchanged.
    let again = reopened.deploy("sha256:bbb", 43, &cfg).expect("deploy");
    assert!(!again.created);
    assert_eq!(again.version.version, 2);
}

#[test]
fn times_are_rfc3339_utc() {
    let f = fixture();
    let d = f
        .store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy");
    let parsed = chrono::DateTime::parse_from_rfc3339(&d.version.created_at).expect("rfc3339");
    assert_eq!(parsed.offset().local_minus_utc(), 0);
    assert!(
        d.version.created_at.ends_with('Z'),
        "{}",
        d.version.created_at
    );
}

#[test]
fn corrupt_config_is_reported_not_panicked() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy");
    {
        let conn = f.store.lock();
        // The immutability trigger guards against this in normal operation.
        conn.execute_batch(
            "DROP TRIGGER versions_are_immutable;
             UPDATE versions SET config_json = '{\"nope\": 1}';",
        )
        .expect("corrupt the row");
    }
    let err = f.store.get_version("hello", 1).expect_err("corrupt");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(!err.is_user_facing());
}

#[test]
fn versions_cannot_be_updated() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy");
    let conn = f.store.lock();
    let res = conn.execute("UPDATE versions SET digest = 'sha256:evil'", []);
    assert!(res.is_err(), "the trigger must refuse in-place edits");
}

#[test]
fn deploy_rejects_bad_input() {
    let f = fixture();
    let err = f
        .store
        .deploy("", 1, &config("hello", &[]))
        .expect_err("empty digest");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let mut cfg = config("hello", &[]);
    cfg.name = "Bad Name".into();
    let err = f.store.deploy("sha256:a", 1, &cfg).expect_err("bad name");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(f.store.list_functions().expect("list").is_empty());
}

#[test]
fn change_feed_bumps_on_every_committed_change() {
    let f = fixture();
    let mut feed = f.store.subscribe();
    let start = *feed.borrow_and_update();

    f.store
        .deploy("sha256:aaa", 1, &config("hello", &["GET /h"]))
        .expect("deploy");
    assert!(feed.has_changed().expect("alive"), "deploy");
    let after_deploy = *feed.borrow_and_update();
    assert!(after_deploy > start);

    f.store
        .deploy("sha256:bbb", 1, &config("hello", &["GET /h"]))
        .expect("deploy 2");
    feed.borrow_and_update();

    f.store.set_alias("hello", "beta", 1).expect("alias");
    assert!(feed.has_changed().expect("alive"), "set_alias");
    feed.borrow_and_update();

    f.store.rollback("hello", "live").expect("rollback");
    assert!(feed.has_changed().expect("alive"), "rollback");
    feed.borrow_and_update();

    // A failed write changes nothing and must not wake anyone.
    let _ = f.store.set_alias("hello", "beta", 99);
    assert!(!feed.has_changed().expect("alive"), "failed set_alias");

    f.store.delete_function("hello").expect("delete");
    assert!(feed.has_changed().expect("alive"), "delete");
}

#[tokio::test]
async fn change_feed_wakes_async_waiters() {
    let f = fixture();
    let store = Arc::new(f.store);
    let mut feed = store.subscribe();
    let writer = Arc::clone(&store);
    let task =
        tokio::task::spawn_blocking(move || writer.deploy("sha256:aaa", 1, &config("hello", &[])));
    tokio::time::timeout(std::time::Duration::from_secs(10), feed.changed())
        .await
        .expect("woken in time")
        .expect("sender alive");
    task.await.expect("join").expect("deploy");
}

#[test]
fn concurrent_deploys_get_consecutive_versions() {
    let f = fixture();
    let store = Arc::new(f.store);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                store.deploy(&format!("sha256:{i}"), i, &config("hello", &["GET /h"]))
            })
        })
        .collect();
    let mut versions: Vec<u32> = handles
        .into_iter()
        .map(|h| {
            let res = h.join().expect("thread").expect("deploy");
            assert!(res.created);
            res.version.version
        })
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());
    assert_eq!(versions_of(&store, "hello"), (1..=8).collect::<Vec<u32>>());
}

#[test]
fn concurrent_deploys_through_two_connections_wait_instead_of_failing() {
    // Two `Store`s on one file are two SQLite connections: this exercises the file
    // lock, BEGIN IMMEDIATE and busy_timeout rather than only our Mutex.
    let f = fixture();
    let other = Arc::new(Store::open(&f.path).expect("second handle"));
    let first = Arc::new(f.store);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                Arc::clone(&first)
            } else {
                Arc::clone(&other)
            };
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for j in 0..5 {
                    let digest = format!("sha256:{i}-{j}");
                    let res = store
                        .deploy(&digest, 1, &config("hello", &["GET /h"]))
                        .expect("deploy");
                    out.push(res.version.version);
                }
                out
            })
        })
        .collect();
    let mut versions: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=40).collect::<Vec<u32>>());
    let func = first.get_function("hello").expect("get").expect("exists");
    assert_eq!(func.latest_version, 40);
    assert_eq!(func.live_version, Some(40));
}

#[test]
fn functions_get_distinct_stable_sandbox_ids() {
    let f = fixture();
    let a1 = f
        .store
        .deploy("sha256:aaa", 1, &config("a", &[]))
        .expect("a");
    let b1 = f
        .store
        .deploy("sha256:bbb", 1, &config("b", &[]))
        .expect("b");
    assert_ne!(a1.version.sandbox_id, b1.version.sandbox_id);
    let mut cfg = config("a", &[]);
    cfg.memory_mb = 512;
    let a2 = f.store.deploy("sha256:aaa", 1, &cfg).expect("a v2");
    assert_eq!(
        a2.version.sandbox_id, a1.version.sandbox_id,
        "stable across versions"
    );
    let resolved = f
        .store
        .resolve("b", &Target::default())
        .expect("resolve")
        .expect("exists");
    assert_eq!(resolved.sandbox_id, b1.version.sandbox_id);
}

#[test]
fn scaling_overrides_apply_to_every_version_until_cleared() {
    let f = fixture();
    f.store
        .deploy("sha256:aaa", 1, &config("hello", &[]))
        .expect("deploy");
    let row = f
        .store
        .set_scaling("hello", Some(2), Some(20), false)
        .expect("scale");
    assert_eq!(row.scale.min_instances, Some(2));
    let v = f
        .store
        .resolve("hello", &Target::default())
        .expect("resolve")
        .expect("exists");
    assert_eq!(v.config.concurrency.min_instances, 2);
    assert_eq!(v.config.concurrency.max_instances, 20);
    // Only max: min stays; a max below the manifest's min pulls min down with it.
    f.store
        .set_scaling("hello", None, Some(1), false)
        .expect("scale max");
    let v = f
        .store
        .resolve("hello", &Target::default())
        .expect("resolve")
        .expect("exists");
    assert_eq!(v.config.concurrency.max_instances, 1);
    assert_eq!(v.config.concurrency.min_instances, 1);
    f.store
        .set_scaling("hello", None, None, true)
        .expect("clear");
    let v = f
        .store
        .get_version("hello", 1)
        .expect("get")
        .expect("exists");
    assert_eq!(v.config.concurrency, config("hello", &[]).concurrency);
    for (min, max) in [(Some(3), Some(2)), (None, Some(0)), (None, Some(1001))] {
        let err = f
            .store
            .set_scaling("hello", min, max, false)
            .expect_err("invalid");
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
    assert!(matches!(
        f.store.set_scaling("nope", Some(1), None, false),
        Err(Error::NotFound(_))
    ));
}

/// The SQLite store driven only through `Arc<dyn Catalog>`, as the worker holds it:
/// resolution by alias and by version, typed not-found answers, the maintainer's
/// aliased versions, and the change feed.
#[tokio::test]
async fn sqlite_store_serves_the_catalog_trait_object() {
    let f = fixture();
    let store = Arc::new(f.store);
    let catalog: Arc<dyn Catalog> = store.clone();
    let mut feed = catalog.subscribe();

    store
        .deploy("sha256:aaa", 10, &config("hello", &[]))
        .expect("deploy 1");
    let mut cfg = config("hello", &[]);
    cfg.env.insert("GREETING".into(), "hi".into());
    store.deploy("sha256:bbb", 11, &cfg).expect("deploy 2");
    store.set_alias("hello", "beta", 1).expect("alias beta");
    store
        .deploy("sha256:ccc", 12, &config("other", &[]))
        .expect("deploy other");
    assert!(feed.has_changed().expect("alive"), "deploys tick the feed");
    feed.mark_unchanged();

    let live = catalog
        .resolve("hello", &Target::Alias(LIVE_ALIAS.into()))
        .await
        .expect("resolve live");
    assert_eq!((live.version, live.digest.as_str()), (2, "sha256:bbb"));
    let beta = catalog
        .resolve("hello", &Target::Alias("beta".into()))
        .await
        .expect("resolve beta");
    assert_eq!(beta.version, 1);
    let v1 = catalog
        .resolve("hello", &Target::Version(1))
        .await
        .expect("resolve version 1");
    assert_eq!((v1.version, v1.digest.as_str()), (1, "sha256:aaa"));

    let missing = [
        (
            "nope",
            Target::Alias(LIVE_ALIAS.into()),
            "function `nope` not found",
        ),
        (
            "hello",
            Target::Alias("gamma".into()),
            "alias `gamma` of function `hello` not found",
        ),
        (
            "hello",
            Target::Version(9),
            "version 9 of function `hello` not found",
        ),
    ];
    for (function, target, message) in missing {
        let err = catalog
            .resolve(function, &target)
            .await
            .expect_err("missing target");
        assert!(
            matches!(&err, CatalogError::NotFound { function: name, target: t } if name == function && *t == target),
            "{err:?}"
        );
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), message);
    }

    let got = catalog.version("hello", 2).await.expect("version 2");
    assert_eq!(got.map(|v| v.version), Some(2));
    assert!(catalog.version("hello", 9).await.expect("read").is_none());

    let aliased = catalog.aliased_versions().await.expect("aliased versions");
    assert_eq!(
        aliased,
        vec![
            AliasedVersions {
                function: "hello".into(),
                live: Some(2),
                aliased: vec![1, 2],
            },
            AliasedVersions {
                function: "other".into(),
                live: Some(1),
                aliased: vec![1],
            },
        ]
    );

    // A change made elsewhere (the control plane's writes) wakes the catalog's feed.
    let writer = Arc::clone(&store);
    let task =
        tokio::task::spawn_blocking(move || writer.set_scaling("hello", Some(1), None, false));
    tokio::time::timeout(std::time::Duration::from_secs(10), feed.changed())
        .await
        .expect("woken in time")
        .expect("sender alive");
    task.await.expect("join").expect("set scaling");
    let scaled = catalog
        .version("hello", 2)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(scaled.config.concurrency.min_instances, 1);
}
