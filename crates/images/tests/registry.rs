//! Images built here, pushed to a real registry (Debian's `docker-registry`,
//! registry 2.8, started on loopback by each test) and pulled back through
//! the store: by tag and by digest, a tampered blob refused, a layer two
//! images share stored once, whiteouts hiding lower files in a real
//! overlay mount (as root), and an image run by runc as a site's user, in
//! its network, on a read-only root.

use std::path::{Path, PathBuf};
use std::process::Command;

use commons_images::testing::{busybox_layer, layer, push, scratch, start_registry};
use commons_images::{
    sha256_digest, Bundle, Container, Credentials, ImageError, ImageStore, Progress,
    RegistrySettings,
};

fn store(dir: &Path, port: u16) -> ImageStore {
    ImageStore::new(
        &dir.join("images"),
        &RegistrySettings {
            insecure: vec![format!("127.0.0.1:{port}")],
            ..Default::default()
        },
    )
}

/// Incompressible bytes, so a layer's size is what it holds.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn pulls_by_tag_and_digest_and_keeps_a_shared_layer_once() {
    let dir = scratch("share");
    let registry = start_registry(&dir);
    let big = noise(4 << 20, 7);
    let base = layer(&[
        ("usr", None),
        ("usr/lib", None),
        ("usr/lib/big.bin", Some(&big)),
    ]);
    let app_a = layer(&[("srv", None), ("srv/app", Some(b"site a"))]);
    let app_b = layer(&[("srv", None), ("srv/app", Some(b"site b"))]);
    let a = push(registry.port, "apps/a:1.0", &[base.clone(), app_a]).await;
    let b = push(registry.port, "apps/b:1.0", &[base.clone(), app_b]).await;
    let images = store(&dir, registry.port);

    let seen = std::sync::Mutex::new(Vec::<Progress>::new());
    let record = |p: Progress| seen.lock().unwrap().push(p);
    let pulled_a = images
        .pull(
            &format!("127.0.0.1:{}/apps/a:1.0", registry.port),
            &Credentials::Anonymous,
            &record,
        )
        .await
        .unwrap();
    assert_eq!(
        pulled_a.digest, a,
        "by tag: the manifest the registry holds"
    );
    assert_eq!(pulled_a.config.cmd, Some(vec!["/bin/app".to_string()]));
    assert_eq!(pulled_a.config.working_dir.as_deref(), Some("/srv"));
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!((last.layers_done, last.layers), (2, 2));
    assert_eq!(last.fetched, last.to_fetch);
    assert!(last.to_fetch as usize > big.len(), "{last:?}");
    let lowers = images.lower_dirs(&pulled_a);
    assert_eq!(std::fs::read(lowers[0].join("srv/app")).unwrap(), b"site a");
    assert_eq!(
        std::fs::read(lowers[1].join("usr/lib/big.bin")).unwrap(),
        big
    );
    let after_a = images.disk_usage();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("images")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "the store is root's alone");

    // The second image, by digest: only its own layer is fetched and stored.
    seen.lock().unwrap().clear();
    let pulled_b = images
        .pull(
            &format!("127.0.0.1:{}/apps/b@{b}", registry.port),
            &Credentials::Anonymous,
            &record,
        )
        .await
        .unwrap();
    assert_eq!(pulled_b.digest, b);
    assert_eq!(
        pulled_b.layers[0], pulled_a.layers[0],
        "the same base layer"
    );
    let last = *seen.lock().unwrap().last().unwrap();
    assert!(
        last.to_fetch < 4096,
        "the base layer is not fetched again: {last:?}"
    );
    let grown = images.disk_usage() - after_a;
    assert!(
        grown < (big.len() / 8) as u64,
        "the second image stores no layer twice: it added {grown} bytes beside a {} byte base",
        big.len()
    );
    assert_eq!(
        std::fs::read(images.lower_dirs(&pulled_b)[0].join("srv/app")).unwrap(),
        b"site b"
    );

    // Pinned by digest and already here: the registry is not asked at all.
    drop(registry);
    let again = images
        .pull(
            &format!("127.0.0.1:1/apps/a@{a}"),
            &Credentials::Anonymous,
            &|_| {},
        )
        .await
        .unwrap();
    assert_eq!(again, pulled_a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_tampered_blob_is_refused_and_nothing_of_it_is_kept() {
    let dir = scratch("tamper");
    let registry = start_registry(&dir);
    let app = layer(&[("srv", None), ("srv/app", Some(b"the real program"))]);
    let app_digest = sha256_digest(&app.0);
    push(registry.port, "apps/t:1", &[app]).await;
    // Someone with the registry's disk swaps the layer's bytes.
    let hex = app_digest.trim_start_matches("sha256:");
    let data = registry
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let (evil, _) = layer(&[("srv", None), ("srv/app", Some(b"a different program"))]);
    std::fs::write(&data, evil).unwrap();

    let images = store(&dir, registry.port);
    let e = images
        .pull(
            &format!("127.0.0.1:{}/apps/t:1", registry.port),
            &Credentials::Anonymous,
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Registry { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("digest"), "{e}");
    assert!(!images.layer_dir(&app_digest).exists(), "nothing unpacked");
    let blobs = dir.join("images/blobs/sha256");
    let left: Vec<_> = std::fs::read_dir(&blobs)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no blob or partial file kept: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn whiteouts_hide_lower_files_in_an_overlay_mount() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "whiteouts (device nodes, trusted xattrs) and overlay mounts need root; run the tests as root"
    );
    let dir = scratch("whiteout");
    let registry = start_registry(&dir);
    let lower = layer(&[
        ("etc", None),
        ("etc/keep", Some(b"kept")),
        ("etc/gone", Some(b"deleted above")),
        ("cache", None),
        ("cache/a", Some(b"a")),
        ("cache/b", Some(b"b")),
    ]);
    let upper = layer(&[
        ("etc", None),
        ("etc/.wh.gone", Some(b"")),
        ("cache", None),
        ("cache/.wh..wh..opq", Some(b"")),
        ("cache/c", Some(b"c")),
    ]);
    push(registry.port, "apps/w:1", &[lower, upper]).await;
    let images = store(&dir, registry.port);
    let pulled = images
        .pull(
            &format!("127.0.0.1:{}/apps/w:1", registry.port),
            &Credentials::Anonymous,
            &|_| {},
        )
        .await
        .unwrap();
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let lowers: Vec<String> = images
        .lower_dirs(&pulled)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mounted = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("ro,lowerdir={}", lowers.join(":")))
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        mounted.status.success(),
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    let exists = |p: &str| root.join(p).exists();
    let checks = (
        exists("etc/keep"),
        exists("etc/gone"),
        exists("cache/a"),
        exists("cache/b"),
        std::fs::read(root.join("cache/c")).ok(),
    );
    let _ = Command::new("umount").arg(&root).status();
    assert_eq!(checks, (true, false, false, false, Some(b"c".to_vec())));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_image_runs_under_runc_as_its_sites_user_in_its_network_on_a_read_only_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "runc, namespaces and overlay mounts need root; run the tests as root"
    );
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("this test needs runc (apt-get install runc; scripts/test installs it)");
    let dir = scratch("runc");
    let registry = start_registry(&dir);
    let app = busybox_layer(&[]);
    push(registry.port, "apps/bb:1", &[app]).await;
    let images = store(&dir, registry.port);
    let image = images
        .pull(
            &format!("127.0.0.1:{}/apps/bb:1", registry.port),
            &Credentials::Anonymous,
            &|_| {},
        )
        .await
        .unwrap();

    let pid = std::process::id();
    let netns = format!("commons-image-test-{pid}");
    let made = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(made.success());
    let uid = 299_999;
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let c = std::ffi::CString::new(data.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path alive for the call.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, uid) }, 0);
    let script = "id -u > /data/uid; hostname > /data/host; \
        (touch /etc/planted 2>/dev/null && echo WROTE || echo read-only) > /data/root; \
        ls /sys/class/net > /data/net; echo $GREETING > /data/env; pwd > /data/cwd; \
        grep CapEff /proc/self/status > /data/caps; exit 3";
    let container = Container {
        id: format!("commons-image-test-{pid}"),
        args: Container::args_of(
            &image,
            Some(&[
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
            ]),
        ),
        env: vec![("PORT".into(), "8080".into())],
        cwd: image
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into()),
        uid,
        hostname: "bbsite".into(),
        netns: PathBuf::from("/run/netns").join(&netns),
        cgroup: format!("commons/image-test-{pid}/web"),
        memory_bytes: Some(64 << 20),
        cpu_millis: None,
        pids: Some(32),
        binds: vec![(data.clone(), "/data".into())],
    };
    let bundle = Bundle::prepare(
        &dir.join("bundle"),
        images.lower_dirs(&image),
        &image,
        &container,
    )
    .unwrap();
    let argv = bundle.command(&runc, &container.id);
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    // Kept after it ended (for its cgroup's counters) until deleted.
    let _ = Command::new(&runc)
        .args(["delete", "--force", &container.id])
        .status();
    let said = |f: &str| {
        std::fs::read_to_string(data.join(f)).unwrap_or_else(|e| {
            panic!(
                "{f}: {e}; runc said: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    assert_eq!(
        out.status.code(),
        Some(3),
        "the container's own exit status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said("uid").trim(), uid.to_string());
    assert_eq!(said("host").trim(), "bbsite");
    assert_eq!(said("root").trim(), "read-only");
    assert_eq!(
        said("net").trim(),
        "lo",
        "only its own network's loopback (no link in this test's namespace)"
    );
    assert_eq!(said("env").trim(), "hello", "the image's environment");
    assert_eq!(said("cwd").trim(), "/srv", "the image's working directory");
    assert_eq!(said("caps").trim(), "CapEff:\t0000000000000000");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&dir.join("bundle").display().to_string()),
        "nothing left mounted on the host"
    );
    assert!(!dir
        .join("images/layers")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|l| l.path().join("etc/planted").exists()));
    let _ = std::fs::remove_dir_all(&dir);
}
