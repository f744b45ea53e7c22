//! The Linode client and provider against the local fake API: lifecycle with slow boots,
//! pagination and X-Filter, 429 with Retry-After, 5xx retries (never for creates), error JSON,
//! and a token that is never shown.

use std::time::{Duration, Instant};

use deployer::config::LinodeConfig;
use deployer::provider::linode::{LinodeClient, LinodeError, LinodeProvider};
use deployer::provider::{InstanceSpec, Provider, ProviderError, Role};
use integration_tests::fake_linode::{FakeLinode, Injection};
use integration_tests::TempDir;

const TOKEN: &str = "s3cret-token-value";

fn client(fake: &FakeLinode) -> LinodeClient {
    let mut c = LinodeClient::new(&fake.base(), TOKEN, Duration::from_secs(5));
    c.backoff = Duration::from_millis(10);
    c
}

fn provider(fake: &FakeLinode, dir: &TempDir) -> LinodeProvider {
    let cfg = LinodeConfig {
        api_url: fake.base(),
        region: "us-east".into(),
        instance_type: "g6-nanode-1".into(),
        image: "linode/debian12".into(),
        authorized_keys_files: vec![],
        ssh_user: "root".into(),
    };
    LinodeProvider::new(client(fake), cfg, "deployer-t".into(), dir.path())
}

fn spec(label: &str) -> InstanceSpec {
    InstanceSpec {
        label: label.into(),
        role: Role::Nameserver,
        region: None,
        instance_type: None,
        image: None,
        vlan: None,
    }
}

#[test]
fn lifecycle_with_slow_boot_pagination_and_tag_filter() {
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode");
    for i in 0..5 {
        fake.seed(&format!("someone-else-{i}"), &["other"]);
    }
    {
        let mut s = fake.state.lock().unwrap();
        s.boot_polls = 4;
        s.max_page_size = 2;
    }
    let p = provider(&fake, &dir);
    let mut ids = Vec::new();
    for l in ["ns1", "ns2", "ns3"] {
        let i = p.create(&spec(l)).unwrap();
        assert_eq!(i.status, "provisioning");
        assert_eq!(i.dns_port, 53);
        ids.push(i.id);
    }
    // A slow boot is waited for.
    let t = Instant::now();
    let running = p.wait_running(ids[0], Duration::from_secs(10)).unwrap();
    assert_eq!(running.status, "running");
    assert!(fake.count("GET", &format!("/v4/linode/instances/{}", ids[0])) >= 4);
    assert!(t.elapsed() < Duration::from_secs(5));
    // Pagination (2 per page) and the tag filter: only ours, all of them.
    let mine = p.list().unwrap();
    let mut labels: Vec<_> = mine.iter().map(|i| i.label.clone()).collect();
    labels.sort();
    assert_eq!(labels, vec!["ns1", "ns2", "ns3"]);
    let listing: Vec<_> = fake
        .state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.starts_with("/v4/linode/instances?"))
        .cloned()
        .collect();
    assert!(listing.len() >= 2, "followed pages: {listing:?}");
    assert!(listing
        .iter()
        .all(|(_, _, f)| f.as_deref() == Some(r#"{"tags":"deployer-t"}"#)));
    // Label lookup, rename, delete; a foreign instance is invisible.
    assert_eq!(p.find_by_label("ns2").unwrap().unwrap().id, ids[1]);
    assert!(p.find_by_label("someone-else-1").unwrap().is_none());
    p.rename(ids[1], "ns2-renamed").unwrap();
    assert_eq!(p.get(ids[1]).unwrap().unwrap().label, "ns2-renamed");
    p.delete(ids[2]).unwrap();
    assert!(p.get(ids[2]).unwrap().is_none());
    // Deleting something already gone is not an error.
    p.delete(ids[2]).unwrap();
    assert_eq!(p.list().unwrap().len(), 2);
}

#[test]
fn rate_limit_is_honoured_with_retry_after() {
    let fake = FakeLinode::start(TOKEN);
    let c = client(&fake);
    fake.state.lock().unwrap().inject.push_back(Injection {
        method: Some("GET".into()),
        status: 429,
        retry_after: Some(1),
    });
    let t = Instant::now();
    let all = c.list_instances(&serde_json::json!({})).unwrap();
    assert!(all.is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(fake.count("GET", "/v4/linode/instances"), 2);
    // A 429 on a create is safe to retry: the request was not processed.
    fake.state.lock().unwrap().inject.push_back(Injection {
        method: Some("POST".into()),
        status: 429,
        retry_after: Some(0),
    });
    let dir = TempDir::new("linode");
    provider(&fake, &dir).create(&spec("ns1")).unwrap();
    assert_eq!(fake.count("POST", "/v4/linode/instances"), 2);
}

#[test]
fn server_errors_are_retried_for_reads_but_a_create_is_never_blindly_repeated() {
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode");
    let p = provider(&fake, &dir);
    for _ in 0..2 {
        fake.state.lock().unwrap().inject.push_back(Injection {
            method: Some("GET".into()),
            status: 503,
            retry_after: None,
        });
    }
    assert!(p.list().unwrap().is_empty());
    assert_eq!(fake.count("GET", "/v4/linode/instances"), 3);

    fake.state.lock().unwrap().inject.push_back(Injection {
        method: Some("POST".into()),
        status: 500,
        retry_after: None,
    });
    let e = p.create(&spec("ns1")).unwrap_err().to_string();
    assert!(e.contains("500"), "{e}");
    assert_eq!(
        fake.count("POST", "/v4/linode/instances"),
        1,
        "no blind retry of a create"
    );

    // Persistent failures give up with a clear error.
    for _ in 0..10 {
        fake.state.lock().unwrap().inject.push_back(Injection {
            method: Some("GET".into()),
            status: 502,
            retry_after: None,
        });
    }
    let e = client(&fake).get_instance(1).unwrap_err();
    assert!(matches!(e, LinodeError::RetriesExhausted { .. }), "{e}");
    assert!(e.to_string().contains("502"));
}

#[test]
fn api_errors_are_shown_and_the_token_never_is() {
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode");
    let p = provider(&fake, &dir);
    p.create(&spec("ns1")).unwrap();
    let e = p.create(&spec("ns1")).unwrap_err();
    assert!(matches!(e, ProviderError::Api(_)));
    let e = e.to_string();
    assert!(
        e.contains("HTTP 400") && e.contains("label: Label must be unique"),
        "{e}"
    );

    let bad = LinodeClient::new(&fake.base(), "wrong", Duration::from_secs(5));
    let e = bad
        .list_instances(&serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("Invalid Token"), "{e}");

    let c = client(&fake);
    assert!(!format!("{c:?}").contains(TOKEN));
    assert!(!e.contains("wrong"));
    if std::env::var_os("LINODE_TOKEN").is_none() {
        let e = LinodeClient::from_env(&fake.base(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, LinodeError::MissingToken));
        assert!(e.to_string().contains("LINODE_TOKEN"));
    }
}

#[test]
fn documented_rules_are_checked_before_any_call() {
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode");
    let p = provider(&fake, &dir);
    for bad in [
        "ab",
        "a--b",
        "a__b",
        "a..b",
        "-abc",
        "abc-",
        "ab c",
        "ns1/x",
        &"x".repeat(65),
    ] {
        let e = p.create(&spec(bad)).unwrap_err().to_string();
        assert!(e.contains("not sent") && e.contains("label"), "{bad}: {e}");
    }
    // The roll's `-next` labels, mixed punctuation and 64 characters are fine.
    for good in ["ns1-next", "a-_b.c", "a.b-next", &"y".repeat(64)] {
        p.create(&spec(good)).unwrap();
    }
    assert_eq!(
        fake.count("POST", "/v4/linode/instances"),
        4,
        "no invalid create was sent"
    );
    let c = client(&fake);
    let e = c
        .list_instances_paged(&serde_json::json!({}), 10)
        .unwrap_err();
    assert!(matches!(e, LinodeError::Invalid { .. }), "{e}");
    let e = c.update_label(1, "a..b").unwrap_err().to_string();
    assert!(e.contains("label"), "{e}");
    let mut s = spec("ns9");
    s.region = Some(" ".into());
    let e = p.create(&s).unwrap_err().to_string();
    assert!(e.contains("region"), "{e}");
    assert_eq!(fake.count("POST", "/v4/linode/instances"), 4);
    assert_eq!(fake.count("PUT", "/v4/linode/instances"), 0);
}

#[test]
fn creates_are_paced_under_the_documented_rate_limit() {
    let fake = FakeLinode::start(TOKEN);
    fake.state.lock().unwrap().create_limit = (2, Duration::from_secs(1));
    let dir = TempDir::new("linode");
    let mut c = client(&fake);
    c.create_limit = (2, Duration::from_secs(1));
    let cfg = LinodeConfig {
        api_url: fake.base(),
        region: "us-east".into(),
        instance_type: "g6-nanode-1".into(),
        image: "linode/debian12".into(),
        authorized_keys_files: vec![],
        ssh_user: "root".into(),
    };
    let p = LinodeProvider::new(c, cfg, "deployer-t".into(), dir.path());
    let t = Instant::now();
    for k in 0..5 {
        p.create(&spec(&format!("ns{k}"))).unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "5 creates at 2 per second take 2 s: {:?}",
        t.elapsed()
    );
    assert_eq!(
        fake.state.lock().unwrap().creates_rate_limited,
        0,
        "the client never hit the create limit"
    );
    // The fake enforces it: an unpaced client gets a 429 with Retry-After, and waits.
    let mut fast = client(&fake);
    fast.create_limit = (100, Duration::from_secs(1));
    fast.create_instance(&create_req("fast1")).unwrap();
    fast.create_instance(&create_req("fast2")).unwrap();
    fast.create_instance(&create_req("fast3")).unwrap();
    assert!(fake.state.lock().unwrap().creates_rate_limited >= 1);
}

fn create_req(label: &str) -> deployer::provider::linode::CreateInstance {
    deployer::provider::linode::CreateInstance {
        label: label.into(),
        region: "us-east".into(),
        instance_type: "g6-nanode-1".into(),
        image: "linode/debian12".into(),
        root_pass: "aComplexP@ssword9".into(),
        authorized_keys: vec![],
        tags: vec!["deployer-t".into()],
        booted: true,
        interfaces: None,
    }
}

#[test]
fn a_boot_timeout_names_the_instance() {
    let fake = FakeLinode::start(TOKEN);
    fake.state.lock().unwrap().boot_polls = 1000;
    let dir = TempDir::new("linode");
    let p = provider(&fake, &dir);
    let i = p.create(&spec("ns-slow")).unwrap();
    let e = p
        .wait_running(i.id, Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ns-slow") && e.contains(&i.id.to_string()),
        "{e}"
    );
}

#[test]
fn the_schemas_catch_drift_and_the_fake_conforms() {
    use integration_tests::openapi::{request_pointer, response_pointer, violations};
    let create = request_pointer("POST", "/linode/instances");
    let ok = serde_json::to_value(create_req("ns1-next")).unwrap();
    assert!(violations(&create, &ok).is_empty());
    for (field, bad) in [
        ("type", serde_json::json!(5)),
        ("label", serde_json::json!("ab")),
        ("label", serde_json::json!("a--b")),
        ("tags", serde_json::json!("not-a-list")),
    ] {
        let mut body = ok.clone();
        body[field] = bad;
        assert!(!violations(&create, &body).is_empty(), "{field}: {body}");
    }
    let mut no_region = ok.clone();
    no_region.as_object_mut().unwrap().remove("region");
    assert!(
        !violations(&create, &no_region).is_empty(),
        "region is required"
    );
    // Responses: a drifted instance (ipv4 as a string) is caught; an error without `field` is
    // valid (it is omitted when not relevant).
    let get = response_pointer("GET", "/linode/instances/{linodeId}", 200);
    assert!(!violations(&get, &serde_json::json!({"id": 1, "ipv4": "192.0.2.1"})).is_empty());
    let err = response_pointer("GET", "/linode/instances/{linodeId}", 404);
    assert!(violations(
        &err,
        &serde_json::json!({"errors": [{"reason": "Not found"}]})
    )
    .is_empty());
    assert!(!violations(&err, &serde_json::json!({"errors": [{"field": 3}]})).is_empty());
    // A whole lifecycle through the fake: every response was checked (and dropping the fake
    // asserts there was no violation).
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode");
    let p = provider(&fake, &dir);
    let i = p.create(&spec("ns1")).unwrap();
    p.list().unwrap();
    p.rename(i.id, "ns1-next").unwrap();
    p.delete(i.id).unwrap();
    assert!(p.get(i.id).unwrap().is_none());
    let s = fake.state.lock().unwrap();
    assert!(s.responses_checked >= 5, "{}", s.responses_checked);
    assert!(s.violations.is_empty(), "{:?}", s.violations);
}
