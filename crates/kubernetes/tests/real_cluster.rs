//! Against a real cluster, when `COMMONS_TEST_KUBECONFIG` names a
//! kubeconfig whose current context may create namespaces: a site is
//! deployed, becomes ready, is redeployed with a component removed (which is
//! pruned), is read back, and is destroyed. Without the variable the test
//! says it was skipped and checks nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use commons_kubernetes::{render, Cluster, Settings, State, Values};

fn blueprint(text: &str) -> commons_blueprint::Blueprint {
    let files =
        commons_blueprint::InMemory([(PathBuf::from("commons.yaml"), text.to_string())].into());
    commons_blueprint::load(Path::new("commons.yaml"), &files).unwrap()
}

#[tokio::test]
async fn a_site_comes_up_is_pruned_and_goes_on_a_real_cluster() {
    let Some(kubeconfig) = std::env::var_os("COMMONS_TEST_KUBECONFIG") else {
        // Straight to stderr: the test harness would hide a passing test's
        // `eprintln!`, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: a_site_comes_up_is_pruned_and_goes_on_a_real_cluster needs a Kubernetes \
             cluster; set COMMONS_TEST_KUBECONFIG to a kubeconfig to run it (the mocked API \
             of tests/cluster.rs ran instead)"
        );
        return;
    };
    let cluster = Cluster::from_kubeconfig(Path::new(&kubeconfig))
        .await
        .unwrap();
    let site = format!("test-{}", std::process::id());
    let two = r#"
name: hello
components:
  web:
    image: docker.io/library/busybox:1.36
    command: [httpd, -f, -p, "8080", -h, /tmp]
    port: 8080
    replicas: 2
    health: { http: / }
    resources: { memory: 32Mi, cpu: 0.1 }
  worker:
    image: docker.io/library/busybox:1.36
    command: [sleep, "3600"]
    port: 9000
    resources: { memory: 16Mi, cpu: 0.05 }
"#;
    let settings = Settings::default();
    let values = Values {
        secrets: BTreeMap::new(),
        ..Values::default()
    };
    let m = render(&site, &blueprint(two), &values, &settings).unwrap();
    let statuses = cluster
        .deploy(&m, Duration::from_secs(300), &mut |s| {
            eprintln!("{} {:?}", s.object, s.state)
        })
        .await
        .unwrap();
    assert!(statuses.iter().all(|s| s.state == State::Ready));

    let one = two.split("  worker:").next().unwrap();
    let m = render(&site, &blueprint(one), &values, &settings).unwrap();
    cluster
        .deploy(&m, Duration::from_secs(300), &mut |_| {})
        .await
        .unwrap();
    let now = cluster.status(&site, &m.namespace).await.unwrap();
    let objects: Vec<&str> = now.iter().map(|s| s.object.as_str()).collect();
    assert_eq!(objects, ["Deployment/web"], "the worker was pruned");
    assert_eq!((now[0].desired, now[0].ready), (2, 2));

    cluster.destroy(&m.namespace).await.unwrap();
}
