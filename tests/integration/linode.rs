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
