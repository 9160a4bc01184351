//! A site's network, asked for by several of its workloads at once (a
//! deploy starts its jobs together): every one of them gets the namespace
//! that stays, and the site keeps its way out — never taken back by
//! another's clean-up of the new index (a job once found no DNS for its
//! whole life that way). Needs root (namespaces, links, nftables), as the tests
//! of sandboxed sites do.

use std::os::unix::fs::MetadataExt;

#[test]
fn workloads_asking_at_once_get_the_same_lasting_namespace() {
    assert!(
        is_root(),
        "site networks need root (network namespaces, veth links, nftables); run the tests as root"
    );
    let home = std::env::temp_dir().join(format!("commons-site-network-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    for round in 0..20 {
        let deployment = format!("race-{round}");
        let seen: Vec<(String, u64, String)> = std::thread::scope(|s| {
            let askers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let net =
                            commons_runtime::net::site_network(&home, &deployment, true).unwrap();
                        let path = format!("/run/netns/{}", net.netns);
                        let inode = std::fs::metadata(&path).unwrap().ino();
                        (path, inode, net.site_ip.to_string())
                    })
                })
                .collect();
            askers.into_iter().map(|a| a.join().unwrap()).collect()
        });
        // Out to the internet (and DNS), as asked: not taken back by the
        // clean-up of the index.
        let egress = std::process::Command::new("nft")
            .args(["list", "set", "inet", "commons", "egress_sites"])
            .output()
            .unwrap();
        let egress = String::from_utf8_lossy(&egress.stdout);
        let site_ip = &seen[0].2;
        assert!(
            egress.contains(&format!("{site_ip},"))
                || egress.contains(&format!("{site_ip} "))
                || egress.contains(&format!("{site_ip}\n")),
            "round {round}: the site {site_ip} lost its way out: {egress}"
        );
        for (path, inode, _) in &seen {
            assert_eq!(path, &seen[0].0, "one network for the site");
            assert_eq!(
                std::fs::metadata(path).unwrap().ino(),
                *inode,
                "round {round}: a workload's namespace was replaced after it was given"
            );
        }
        commons_runtime::net::remove_site(&home, &deployment);
        assert!(!std::path::Path::new(&seen[0].0).exists());
    }
    let _ = std::fs::remove_dir_all(&home);
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}
