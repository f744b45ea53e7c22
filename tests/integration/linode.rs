//! The Linode client and provider against the local fake API: lifecycle with slow boots,
//! pagination and X-Filter, 429 with Retry-After, 5xx retries (never for creates), error JSON,
//! and a token that is never shown.

use std::time::{Duration, Instant};

use deployer::config::LinodeConfig;
use deployer::provider::linode::{LinodeClient, LinodeError, LinodeProvider};
use deployer::provider::{InstanceSpec, Provider, ProviderError, Role};
use integration_tests::fake_linode::{CreateFault, FakeLinode, Injection};
use integration_tests::TempDir;

const TOKEN: &str = "s3cret-token-value";

fn client(fake: &FakeLinode) -> LinodeClient {
    let mut c = LinodeClient::new(&fake.base(), TOKEN, Duration::from_secs(5));
    c.backoff = Duration::from_millis(10);
    c
}

/// The `[linode]` section of a deployer on the fake API.
fn linode_config(fake: &FakeLinode) -> LinodeConfig {
    LinodeConfig {
        api_url: fake.base(),
        region: "us-east".into(),
        instance_type: "g6-nanode-1".into(),
        image: "linode/debian12".into(),
        authorized_keys_files: vec![],
        ssh_user: "root".into(),
        ssh_command: "ssh".into(),
    }
}

fn provider(fake: &FakeLinode, dir: &TempDir) -> LinodeProvider {
    let cfg = linode_config(fake);
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
        operation: None,
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
    // A slow boot is waited for: polled until it runs (the fake says `running` at the 4th
    // GET), and not once more.
    let running = p.wait_running(ids[0], Duration::from_secs(10)).unwrap();
    assert_eq!(running.status, "running");
    assert_eq!(
        fake.count("GET", &format!("/v4/linode/instances/{}", ids[0])),
        4
    );
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
fn retry_after_is_honoured_as_sent_within_the_retry_deadline() {
    let fake = FakeLinode::start(TOKEN);
    let mut c = client(&fake);
    let rate_limit = |retry_after| Injection {
        method: Some("GET".into()),
        status: 429,
        retry_after: Some(retry_after),
    };
    // More rate limits in a row than attempts for server errors (6): Linode says when to come
    // back, so they are bounded by the deadline, not by a count.
    for _ in 0..8 {
        fake.state.lock().unwrap().inject.push_back(rate_limit(0));
    }
    assert!(c.list_instances(&serde_json::json!({})).unwrap().is_empty());
    assert_eq!(fake.count("GET", "/v4/linode/instances"), 9);
    // A wait past the deadline is not made at all (nor cut short): one request, and an error
    // that says how long Linode asked for and what the deadline is. 61 s is compared as sent
    // (a 60 s cap would have fit the 60 s deadline and slept).
    c.retry_deadline = Duration::from_secs(60);
    fake.state.lock().unwrap().inject.push_back(rate_limit(61));
    let e = c.list_instances(&serde_json::json!({})).unwrap_err();
    assert!(
        matches!(
            e,
            LinodeError::RateLimited {
                retry_after: 61,
                deadline: 60,
                attempts: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("retry after 61s") && msg.contains("api_retry_secs"),
        "{msg}"
    );
    assert_eq!(fake.count("GET", "/v4/linode/instances"), 10, "not retried");
    // Whatever the server sends: the largest value is an error, not an overflow.
    fake.state
        .lock()
        .unwrap()
        .inject
        .push_back(rate_limit(u64::MAX));
    let e = c.list_instances(&serde_json::json!({})).unwrap_err();
    assert!(
        matches!(
            e,
            LinodeError::RateLimited {
                retry_after: u64::MAX,
                ..
            }
        ),
        "{e:?}"
    );
    // Server errors stop at the deadline too, saying so.
    c.retry_deadline = Duration::ZERO;
    fake.state.lock().unwrap().inject.push_back(Injection {
        method: Some("GET".into()),
        status: 503,
        retry_after: None,
    });
    let e = c.get_instance(1).unwrap_err().to_string();
    assert!(e.contains("503") && e.contains("retry deadline"), "{e}");
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
    assert!(
        matches!(&e, ProviderError::LabelInUse { label, .. } if label == "ns1"),
        "{e:?}"
    );
    assert!(e.create_refused());
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
    let cfg = linode_config(&fake);
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

// ---------------------------------------------------------------------------------------------
// The private network (issue #21): VLAN interfaces on create, held to Linode's published
// `LinodeConfigInterface` schema and its prose rules; addresses allocated across old and -next
// instances; a region without VLANs and mixed regions refused before anything is created.

fn vlan_spec(label: &str, role: Role, address: [u8; 4]) -> InstanceSpec {
    InstanceSpec {
        label: label.into(),
        role,
        region: None,
        instance_type: None,
        image: None,
        vlan: Some(deployer::provider::VlanAttachment {
            label: "dns-backplane".into(),
            address: address.into(),
            prefix_len: 24,
        }),
        operation: None,
    }
}

#[test]
fn vlan_interfaces_validate_against_the_published_schema_and_the_address_is_read_back() {
    use deployer::provider::linode::InterfaceRequest;
    use integration_tests::openapi::{request_pointer, violations};
    // The client's interfaces, one by one, against LinodeConfigInterface itself.
    let iface = "/components/schemas/LinodeConfigInterface";
    for i in [
        InterfaceRequest::public(),
        InterfaceRequest::vlan("dns-backplane", "10.0.0.7/24"),
    ] {
        let v = serde_json::to_value(&i).unwrap();
        assert!(violations(iface, &v).is_empty(), "{v}");
    }
    // The schema catches drift in the body: a purpose it does not know, an address that is not
    // a string, more than three interfaces.
    let create = request_pointer("POST", "/linode/instances");
    let mut body = serde_json::to_value(create_req("ns1")).unwrap();
    for bad in [
        serde_json::json!([{"purpose": "private"}]),
        serde_json::json!([{"purpose": "vlan", "label": "x", "ipam_address": 10}]),
        serde_json::json!([{"purpose": "public"}, {"purpose": "vlan", "label": "a"}, {"purpose": "vlan", "label": "b"}, {"purpose": "vlan", "label": "c"}]),
    ] {
        body["interfaces"] = bad.clone();
        assert!(!violations(&create, &body).is_empty(), "{bad}");
    }

    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-vlan");
    let p = provider(&fake, &dir);
    let ns = p
        .create(&vlan_spec("ns1", Role::Nameserver, [10, 0, 0, 1]))
        .unwrap();
    let lb = p
        .create(&vlan_spec("lb1", Role::Lb, [10, 0, 0, 2]))
        .unwrap();
    // Exactly what was sent: the public interface by its purpose only, first (eth0), then the VLAN.
    let s = fake.state.lock().unwrap();
    assert_eq!(
        s.interfaces[&ns.id],
        serde_json::json!([
            {"purpose": "public"},
            {"purpose": "vlan", "label": "dns-backplane", "ipam_address": "10.0.0.1/24"}
        ])
    );
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    drop(s);
    // The API does not return interfaces: the address comes back from the instance's tag.
    let listed = p.list().unwrap();
    let addr = |label: &str| {
        listed
            .iter()
            .find(|i| i.label == label)
            .unwrap()
            .private_address
            .map(|a| a.to_string())
    };
    assert_eq!(addr("ns1").as_deref(), Some("10.0.0.1"));
    assert_eq!(addr("lb1").as_deref(), Some("10.0.0.2"));
    assert_eq!(lb.region.as_deref(), Some("us-east"));
    assert_eq!(
        listed[0].backend_addr().to_string(),
        format!("{}:53", addr(&listed[0].label).unwrap())
    );
    // Invalid interfaces are never sent.
    let mut bad = vlan_spec("ns2", Role::Nameserver, [10, 0, 0, 3]);
    bad.vlan.as_mut().unwrap().label = "a--b".into();
    let e = p.create(&bad).unwrap_err().to_string();
    assert!(
        e.contains("not sent") && e.contains("interfaces[1].label"),
        "{e}"
    );
    assert_eq!(fake.count("POST", "/v4/linode/instances"), 2);
}

#[test]
fn a_region_without_vlans_is_named_and_refused() {
    use deployer::provider::VlanSupport;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-region");
    let p = provider(&fake, &dir);
    assert_eq!(p.vlan_support("us-east").unwrap(), VlanSupport::Yes);
    match p.vlan_support("xx-novlan").unwrap() {
        VlanSupport::No { capabilities } => assert!(capabilities.contains(&"Linodes".to_string())),
        other => panic!("{other:?}"),
    }
    let e = p.vlan_support("nowhere").unwrap_err().to_string();
    assert!(e.contains("/regions/nowhere") && e.contains("404"), "{e}");
    // Sent anyway, the API refuses a VLAN interface there (the fake as Linode would).
    let mut s = vlan_spec("ns1", Role::Nameserver, [10, 0, 0, 1]);
    s.region = Some("xx-novlan".into());
    let e = p.create(&s).unwrap_err().to_string();
    assert!(e.contains("400") && e.contains("xx-novlan"), "{e}");
    assert!(fake.state.lock().unwrap().responses_checked >= 3);
}

/// A deployer on the fake Linode (its provider swapped in after construction, so that no
/// token has to be put in the environment of a multi-threaded test).
fn linode_deployer(fake: &FakeLinode, dir: &TempDir, extra: &str) -> deployer::Deployer {
    std::fs::create_dir_all(dir.path().join("ansible/zones")).unwrap();
    std::fs::write(
        dir.path().join("ansible/zones/example.test.zone"),
        "$TTL 300\n@ IN SOA ns1 host 7 2 3 4 5\n@ IN NS ns1\nns1 IN A 192.0.2.1\n",
    )
    .unwrap();
    let cfg = dir.path().join("deployer.toml");
    std::fs::write(
        &cfg,
        format!(
            "deployment = \"t\"\nstate_dir = \"state\"\nansible_dir = \"ansible\"\n[provider]\nkind = \"local\"\n\
             [[nameservers]]\nname = \"ns1\"\n[[nameservers]]\nname = \"ns2\"\n[zones]\nnames = [\"example.test\"]\n\
             [[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\", \"ns2\"]\n[network]\nvlan = \"dns-backplane\"\nsubnet = \"10.9.0.0/28\"\n{extra}"
        ),
    )
    .unwrap();
    let c = deployer::config::DeployerConfig::read(&cfg).unwrap();
    let mut d = deployer::Deployer::new(c, true).unwrap();
    d.cfg.provider.kind = deployer::config::ProviderKind::Linode;
    // The fake's instances have made-up addresses: "ssh" to them (the deployer waits for SSH
    // after a create) is `true`, which always connects.
    d.cfg.linode = Some(LinodeConfig {
        ssh_command: "true".into(),
        ..linode_config(fake)
    });
    let c = d.cfg.clone();
    let mut client = client(fake);
    client.backoff = Duration::from_millis(5);
    d.provider = Box::new(LinodeProvider::new(
        client,
        c.linode.clone().unwrap(),
        c.tag(),
        dir.path(),
    ));
    d
}

#[test]
fn vlan_addresses_are_allocated_across_old_and_next_instances_and_recorded_first() {
    use deployer::journal::{Journal, Operation};
    use deployer::lifecycle::create;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-alloc");
    let d = linode_deployer(&fake, &dir, "");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let private = |label: &str| {
        d.find(label)
            .unwrap()
            .unwrap_or_else(|| panic!("{label} exists"))
            .private_address
    };
    // up: ns1, ns2, lb1 take the lowest addresses, in order.
    let mut j = Journal::new(Operation::Up, vec![]);
    create(&d, &mut j, Role::Nameserver, false).unwrap();
    create(&d, &mut j, Role::Lb, false).unwrap();
    assert_eq!(private("ns1"), Some(ip("10.9.0.1")));
    assert_eq!(private("ns2"), Some(ip("10.9.0.2")));
    assert_eq!(private("lb1"), Some(ip("10.9.0.3")));
    let recorded: Vec<_> = j
        .vlan_addresses
        .iter()
        .map(|a| (a.label.as_str(), a.address.to_string()))
        .collect();
    assert_eq!(
        recorded,
        vec![
            ("ns1", "10.9.0.1".into()),
            ("ns2", "10.9.0.2".into()),
            ("lb1", "10.9.0.3".into())
        ]
    );
    // A roll: the -next nameservers never reuse an address the old ones still hold.
    let mut r = Journal::new(Operation::Roll, vec![]);
    create(&d, &mut r, Role::Nameserver, true).unwrap();
    assert_eq!(private("ns1-next"), Some(ip("10.9.0.4")));
    assert_eq!(private("ns2-next"), Some(ip("10.9.0.5")));
    // The journal on disk holds them (written before each create call).
    let on_disk = std::fs::read_to_string(dir.path().join("state/journal.json")).unwrap();
    assert!(
        on_disk.contains("ns2-next") && on_disk.contains("10.9.0.5"),
        "{on_disk}"
    );
    // The old ones go, the new ones are renamed: their addresses are free for the next roll.
    for l in ["ns1", "ns2"] {
        let i = d.find(l).unwrap().unwrap();
        d.provider.delete(i.id).unwrap();
    }
    for l in ["ns1", "ns2"] {
        let i = d.find(&format!("{l}-next")).unwrap().unwrap();
        d.provider.rename(i.id, l).unwrap();
    }
    // A crash between recording an address and the create call: the retried create reuses it.
    let mut r2 = Journal::new(Operation::Roll, vec![]);
    r2.vlan_addresses.push(deployer::journal::VlanAddress {
        label: "ns1-next".into(),
        address: "10.9.0.2".parse().unwrap(),
    });
    create(&d, &mut r2, Role::Nameserver, true).unwrap();
    assert_eq!(private("ns1-next"), Some(ip("10.9.0.2")));
    assert_eq!(private("ns2-next"), Some(ip("10.9.0.1")));
    let s = fake.state.lock().unwrap();
    assert!(s.vlan_conflicts.is_empty(), "{:?}", s.vlan_conflicts);
    assert_eq!(s.interfaces.len(), 7);
}

#[test]
fn the_network_preflight_refuses_before_anything_is_created() {
    use deployer::journal::Operation;
    use deployer::network::preflight;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-preflight");
    let mut d = linode_deployer(&fake, &dir, "");
    assert_eq!(preflight(&d, Operation::Up, &[]).unwrap(), None);
    // An lb created before [network] vlan was set cannot reach VLAN-only nameservers.
    let plain = InstanceSpec {
        label: "lb1".into(),
        role: Role::Lb,
        region: None,
        instance_type: None,
        image: None,
        vlan: None,
        operation: None,
    };
    d.provider.create(&plain).unwrap();
    let existing = d.provider.list().unwrap();
    let e = preflight(&d, Operation::Roll, &existing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lb1") && e.contains("roll-lb` first"), "{e}");
    assert!(preflight(&d, Operation::RollLb, &existing).is_ok());
    // An instance in another region than the VLAN's.
    let mut elsewhere = existing.clone();
    elsewhere[0].region = Some("eu-central".into());
    let e = preflight(&d, Operation::RollLb, &elsewhere)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eu-central") && e.contains("us-east"), "{e}");
    // A region without VLANs is named, with what the operator can do instead.
    d.cfg.linode.as_mut().unwrap().region = "xx-novlan".into();
    let e = preflight(&d, Operation::Up, &[]).unwrap_err().to_string();
    assert!(
        e.contains("region xx-novlan does not offer VLANs") && e.contains("remove [network] vlan"),
        "{e}"
    );
    assert_eq!(
        fake.count("POST", "/v4/linode/instances"),
        1,
        "only the test's own lb"
    );
}

// ---------------------------------------------------------------------------------------------
// Before anything is created, and `lb ctl` over SSH.

#[test]
fn a_missing_lb_package_is_refused_before_any_vm_is_created() {
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-pkg");
    let mut d = linode_deployer(&fake, &dir, "");
    let e = format!("{:#}", d.up(false, false).unwrap_err());
    assert!(
        e.contains("lb lb1")
            && e.contains("`lb_package` is not set")
            && e.contains("scripts/package.sh"),
        "{e}"
    );
    let e = format!("{:#}", d.roll_lb(false, false).unwrap_err());
    assert!(e.contains("`lb_package` is not set"), "{e}");
    d.cfg.ansible.extra_vars.insert(
        "lb_package".into(),
        serde_json::json!("/nonexistent/lb_0.1.0-1_amd64.deb"),
    );
    let e = format!("{:#}", d.up(false, false).unwrap_err());
    assert!(
        e.contains("/nonexistent/lb_0.1.0-1_amd64.deb does not exist"),
        "{e}"
    );
    assert_eq!(
        fake.count("POST", "/v4/linode/instances"),
        0,
        "nothing created"
    );
}

/// A stand-in for ssh (`[linode] ssh_command`): a shell script with `body`.
fn fake_ssh(dir: &TempDir, name: &str, body: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&p)
        .status()
        .unwrap();
    p.display().to_string()
}

#[test]
fn over_ssh_only_an_answer_from_lb_is_a_refusal() {
    use deployer::lbctl::{CtlError, LbControl};
    use integration_tests::{bin, lb_config, Lb};
    let dir = TempDir::new("fake-ssh");
    let args = dir.path().join("ssh-args");
    // Records its arguments, drops ssh's options and the target, and runs `lb ctl --json ...`
    // with the real lb binary, as the lb host would.
    let relay = fake_ssh(
        &dir,
        "ssh-relay",
        &format!(
            "echo \"$@\" >> {}\nwhile [ \"$1\" = -o ]; do shift 2; done\nshift\nshift\nexec {} \"$@\"\n",
            args.display(),
            bin("lb").display()
        ),
    );
    let ctl = |program: &str, socket: &std::path::Path| LbControl::Ssh {
        ssh: deployer::ssh::SshTarget {
            program: program.into(),
            target: "root@192.0.2.1".into(),
            known_hosts: dir.path().join("known_hosts"),
            identity: None,
        },
        socket: socket.into(),
    };
    let t = Duration::from_secs(2);
    // `lb ctl` cannot reach lb (exit 2, with its own {"ok":false,...}): lb said nothing.
    let e = ctl(&relay, &dir.path().join("nothing.sock"))
        .status(t)
        .unwrap_err();
    assert!(matches!(e, CtlError::Transport(_)), "{e:?}");
    assert!(e.to_string().contains("could not reach lb"), "{e}");
    // A real lb: its answers, and its refusals.
    let lb = Lb::start(&lb_config(
        &["127.0.0.1:9".parse().unwrap()],
        "first-available",
        "",
    ));
    let c = ctl(&relay, &lb.socket());
    assert_eq!(c.status(t).unwrap().backends.len(), 1);
    let e = c
        .set_backends(&["not-an-address".into()], false, None, t)
        .unwrap_err();
    assert!(matches!(e, CtlError::Refused(_)), "{e:?}");
    // ssh itself fails (exit 255): no answer.
    let down = fake_ssh(
        &dir,
        "ssh-down",
        "echo 'ssh: connect to host 192.0.2.1 port 22: Connection timed out' >&2\nexit 255\n",
    );
    let e = ctl(&down, &lb.socket()).status(t).unwrap_err();
    assert!(matches!(e, CtlError::Transport(_)), "{e:?}");
    assert!(
        e.to_string().contains("exit 255") && e.to_string().contains("timed out"),
        "{e}"
    );
    // A connection that hangs: killed at its deadline, no answer.
    let hang = fake_ssh(&dir, "ssh-hang", "exec sleep 300\n");
    let e = ctl(&hang, &lb.socket())
        .status(Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(e, CtlError::Transport(_)), "{e:?}");
    assert!(e.to_string().contains("did not finish within"), "{e}");
    // Keepalives end a dead connection; host keys are still checked.
    let sent = std::fs::read_to_string(&args).unwrap();
    for o in [
        "ServerAliveInterval=5",
        "ServerAliveCountMax=2",
        "BatchMode=yes",
        "StrictHostKeyChecking=accept-new",
    ] {
        assert!(sent.contains(o), "{o}: {sent}");
    }
}

// ---------------------------------------------------------------------------------------------
// Lost create replies and labels in use (issue #27).

/// The create's reply is lost after Linode made the instance (the connection drops): the
/// deployer looks the label up and adopts the instance (it carries the deployment's tag and this
/// operation was creating it), instead of failing and creating nothing, or creating it twice.
#[test]
fn a_lost_create_reply_is_looked_up_by_label_and_adopted() {
    use deployer::journal::{Journal, Operation};
    use deployer::lifecycle::create;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-lost-create");
    let d = linode_deployer(&fake, &dir, "");
    fake.state
        .lock()
        .unwrap()
        .create_faults
        .push_back(CreateFault::DropReplyAfterCreate);
    let mut j = Journal::new(Operation::Up, vec![]);
    create(&d, &mut j, Role::Nameserver, false).unwrap();
    assert_eq!(
        fake.count("POST", "/v4/linode/instances"),
        2,
        "one create per instance: the lost one was not sent again"
    );
    let ns1 = d.find("ns1").unwrap().expect("ns1 exists");
    assert!(
        j.created.iter().any(|i| i.id == ns1.id && i.label == "ns1"),
        "adopted: {:?}",
        j.created
    );
    assert!(j.creating.is_empty(), "{:?}", j.creating);
    assert_eq!(fake.state.lock().unwrap().instances.len(), 2);
}

/// A create refused because the label is in use (here another deployer of the deployment won
/// the race: same label, same tag) claims nothing: the undo that follows must not adopt and
/// delete that instance, which this run did not create.
#[test]
fn undo_never_adopts_an_instance_whose_create_was_refused_as_label_in_use() {
    use deployer::journal::{Journal, Operation};
    use deployer::lifecycle::create;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-label-in-use");
    let d = linode_deployer(&fake, &dir, "");
    fake.state
        .lock()
        .unwrap()
        .create_faults
        .push_back(CreateFault::LabelTakenFirst {
            tags: vec!["deployer-t".into(), "role-nameserver".into()],
        });
    let mut j = Journal::new(Operation::Up, vec![]);
    let e = format!(
        "{:#}",
        create(&d, &mut j, Role::Nameserver, false).unwrap_err()
    );
    assert!(
        e.contains("ns1")
            && e.contains("already in use")
            && e.contains("neither adopted nor deleted"),
        "{e}"
    );
    assert!(
        j.creating.is_empty(),
        "no claim on the label: {:?}",
        j.creating
    );
    let theirs = d.find("ns1").unwrap().expect("the other instance");
    deployer::engine::undo(&d, &mut j).unwrap();
    assert_eq!(
        d.find("ns1").unwrap().map(|i| i.id),
        Some(theirs.id),
        "the other instance is still there"
    );
    assert_eq!(fake.count("DELETE", "/v4/linode/instances"), 0);
}

/// `ssh` (here `lb ctl status` over SSH, run by `deployer status`) gets the agent socket and
/// what ssh needs, never the deployer's LINODE_TOKEN nor anything else of its environment.
#[test]
fn ssh_is_not_given_the_linode_token() {
    use integration_tests::bin;
    let fake = FakeLinode::start(TOKEN);
    let dir = TempDir::new("linode-ssh-env");
    fake.seed("lb1", &["deployer-t", "role-lb"]);
    fake.seed("ns1", &["deployer-t", "role-nameserver"]);
    let dump = dir.path().join("ssh-env");
    let ssh = fake_ssh(
        &dir,
        "ssh-env",
        &format!("env > {}\nexit 255\n", dump.display()),
    );
    std::fs::create_dir_all(dir.path().join("ansible/zones")).unwrap();
    std::fs::write(
        dir.path().join("ansible/zones/example.test.zone"),
        "$TTL 300\n@ IN SOA ns1 host 7 2 3 4 5\n@ IN NS ns1\nns1 IN A 192.0.2.1\n",
    )
    .unwrap();
    let cfg = dir.path().join("deployer.toml");
    std::fs::write(
        &cfg,
        format!(
            "deployment = \"t\"\nstate_dir = \"state\"\nansible_dir = \"ansible\"\n[provider]\nkind = \"linode\"\n\
             [linode]\napi_url = \"{}\"\nregion = \"us-east\"\ntype = \"g6-nanode-1\"\nimage = \"linode/debian12\"\nssh_command = \"{ssh}\"\n\
             [[nameservers]]\nname = \"ns1\"\n[zones]\nnames = [\"example.test\"]\n\
             [[lbs]]\nname = \"lb1\"\nfronts = [\"ns1\"]\n[network]\nadmin_networks = [\"198.51.100.0/24\"]\n[timeouts]\nctl_secs = 2\n",
            fake.base()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin("deployer"))
        .arg("-c")
        .arg(&cfg)
        .args(["--json", "status"])
        .env("LINODE_TOKEN", TOKEN)
        .env("SSH_AUTH_SOCK", "/tmp/agent.sock")
        .env("SOME_OTHER_SECRET", "hunter2")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("exit 255"),
        "lb ctl went through the fake ssh: {text}"
    );
    let env = std::fs::read_to_string(&dump).unwrap();
    assert!(env.contains("SSH_AUTH_SOCK=/tmp/agent.sock"), "{env}");
    assert!(env.contains("PATH="), "{env}");
    assert!(
        !env.contains(TOKEN) && !env.contains("LINODE_TOKEN"),
        "{env}"
    );
    assert!(!env.contains("hunter2"), "{env}");
}

// ---------------------------------------------------------------------------------------------
// The lease (issue #27): one deployer per deployment across hosts, held as a Linode tag
// (`POST /tags`, found with `GET /tags`, released with `DELETE /tags/{label}`), every request
// and response held to the spec like the instance endpoints.

fn tag_leases(fake: &FakeLinode) -> std::sync::Arc<dyn deployer::lease::LeaseStore> {
    std::sync::Arc::new(deployer::provider::linode::LinodeTagLeases::new(
        std::sync::Arc::new(client(fake)),
    ))
}

fn lease_times(ttl: u64) -> deployer::lease::LeaseTimes {
    deployer::lease::LeaseTimes {
        ttl: Duration::from_secs(ttl),
        clock_skew: Duration::from_secs(0),
    }
}

#[test]
fn a_lease_tag_keeps_one_deployer_expires_and_is_taken_over() {
    use deployer::lease::{deployment_hash, Lease, LeaseError, LeaseName};
    let fake = FakeLinode::start(TOKEN);
    // Tags of other uses (and an instance's) are listed too, over several pages.
    fake.state.lock().unwrap().max_page_size = 25;
    fake.seed("web1", &["deployer-other", "role-lb"]);
    for k in 0..40 {
        fake.state
            .lock()
            .unwrap()
            .tags
            .insert(format!("team-{k:02}"));
    }
    // Two deployers of deployment `demo`, each with its own client (different hosts).
    let first = Lease::acquire(tag_leases(&fake), "demo", lease_times(60)).unwrap();
    first.check().unwrap();
    assert!(fake.state.lock().unwrap().tags.contains(&first.name()));
    let e = Lease::acquire(tag_leases(&fake), "demo", lease_times(60)).unwrap_err();
    assert!(matches!(e, LeaseError::Held { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("PID {}", std::process::id())) && msg.contains("Linode tag"),
        "the refusal names the holder: {msg}"
    );
    assert!(
        fake.count("GET", "/v4/tags?page=2") > 0,
        "every page of tags is read"
    );
    // The loser withdrew its own tag: only the holder's is left.
    let leases: Vec<String> = fake
        .state
        .lock()
        .unwrap()
        .tags
        .iter()
        .filter(|t| t.starts_with("dlease_"))
        .cloned()
        .collect();
    assert_eq!(leases, vec![first.name()]);
    // Another deployment's lease is another lease.
    drop(Lease::acquire(tag_leases(&fake), "other", lease_times(60)).unwrap());
    drop(first);
    assert!(
        !fake
            .state
            .lock()
            .unwrap()
            .tags
            .iter()
            .any(|t| t.starts_with("dlease_")),
        "released on exit"
    );

    // A holder on another host died: its tag stays until it expires, then is taken over.
    let dead = LeaseName {
        deployment_hash: deployment_hash("demo"),
        expires_unix: deployer::lease::now_unix() + 2,
        nonce: "deadbeef".into(),
        holder: "ci-runner-7-4242".into(),
    }
    .encode();
    client(&fake).create_tag(&dead).unwrap();
    let e = Lease::acquire(tag_leases(&fake), "demo", lease_times(60)).unwrap_err();
    assert!(e.to_string().contains("PID 4242"), "{e}");
    std::thread::sleep(Duration::from_millis(3100));
    let taker = Lease::acquire(tag_leases(&fake), "demo", lease_times(3)).unwrap();
    assert_eq!(taker.took_over.len(), 1, "{:?}", taker.took_over);
    assert!(
        taker.took_over[0].contains("expired"),
        "{:?}",
        taker.took_over
    );
    assert!(!fake.state.lock().unwrap().tags.contains(&dead));
    // It renews (every third of its 3 s): still held well past its first expiry.
    let name = taker.name();
    std::thread::sleep(Duration::from_millis(3500));
    taker.check().unwrap();
    assert_ne!(taker.name(), name, "renewed under a new expiry");

    // A stale holder: another deployer took its lease for expired and deleted it. Its next
    // renewal finds out, and every write it would make is refused from then on.
    client(&fake).delete_tag(&taker.name()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let e = taker.check().unwrap_err().to_string();
    assert!(e.contains("was lost") && e.contains("deleted"), "{e}");
    let st = fake.state.lock().unwrap();
    assert!(
        st.responses_checked > 10,
        "responses checked against the spec"
    );
    assert!(st
        .log
        .iter()
        .any(|(m, p, f)| m == "POST" && p == "/v4/tags" && f.is_none()));
}
