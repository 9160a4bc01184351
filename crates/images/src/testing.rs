//! For tests (this crate's and the platform's): a real registry on
//! loopback (Debian's `docker-registry`, registry 2.8) and images built
//! from files and pushed to it. Nothing here is used by the platform.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::sha256_digest;

/// A registry this test started; stopped when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    /// Where it keeps blobs (`docker/registry/v2/blobs/sha256/…/data`).
    pub storage: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An empty directory for test `test`.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("commons-images-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Starts a registry on a free loopback port, keeping its data under `dir`.
pub fn start_registry(dir: &Path) -> Registry {
    let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("these tests need Debian's docker-registry (apt-get install docker-registry; scripts/test installs it)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let storage = dir.join("registry");
    std::fs::create_dir_all(&storage).unwrap();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{ level: warn }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  \
             cache: {{ blobdescriptor: \"\" }}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let registry = Registry {
        child,
        port,
        storage,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(port, "/v2/")
        .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
    {
        assert!(
            Instant::now() < deadline,
            "the registry did not start: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    registry
}

/// A gzipped tar layer: (path, Some(contents)) files, (path, None) directories.
pub fn layer(entries: &[(&str, Option<&[u8]>)]) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, contents) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match contents {
            Some(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o755);
                h.set_size(bytes.len() as u64);
                tar.append_data(&mut h, path, *bytes).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty()).unwrap();
            }
        }
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = sha256_digest(&raw);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// A layer of programs from this machine — `(host path, path in the image)`
/// — with the shared libraries each loads (as `ldd` says), at the same
/// paths, and `extra` entries: an image of a program from a Debian package.
pub fn host_layer(programs: &[(&str, &str)], extra: &[(&str, Option<&[u8]>)]) -> (Vec<u8>, String) {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (host, inside) in programs {
        let bytes = std::fs::read(host).unwrap_or_else(|e| {
            panic!("{host}: {e} (scripts/test installs the Debian packages test images are built from)")
        });
        files.push((inside.trim_start_matches('/').to_string(), bytes));
        let ldd = std::process::Command::new("ldd")
            .arg(host)
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(lib) = path.filter(|p| p.starts_with('/')) {
                let name = lib.trim_start_matches('/').to_string();
                if !files.iter().any(|(n, _)| *n == name) {
                    files.push((name, std::fs::read(lib).unwrap()));
                }
            }
        }
    }
    let mut dirs: Vec<String> = files
        .iter()
        .flat_map(|(name, _)| std::path::Path::new(name).ancestors().skip(1))
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.display().to_string())
        .collect();
    dirs.dedup();
    dirs.sort();
    dirs.dedup();
    let mut entries: Vec<(&str, Option<&[u8]>)> = dirs.iter().map(|d| (d.as_str(), None)).collect();
    entries.extend(files.iter().map(|(n, b)| (n.as_str(), Some(b.as_slice()))));
    entries.extend_from_slice(extra);
    layer(&entries)
}

/// A layer with a static busybox at `/bin/busybox`, empty `/etc` and
/// `/srv`, and `extra` entries: enough of a root for a test container.
pub fn busybox_layer(extra: &[(&str, Option<&[u8]>)]) -> (Vec<u8>, String) {
    let busybox = std::fs::read("/bin/busybox").expect(
        "test images are built from a static busybox (apt-get install busybox-static; scripts/test installs it)",
    );
    let mut entries: Vec<(&str, Option<&[u8]>)> = vec![
        ("bin", None),
        ("bin/busybox", Some(&busybox)),
        ("etc", None),
        ("srv", None),
    ];
    entries.extend_from_slice(extra);
    layer(&entries)
}

/// A client for the test registry (plain HTTP).
pub fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes an image of `layers` as REPO:TAG; returns its manifest digest.
pub async fn push(port: u16, name: &str, layers: &[(Vec<u8>, String)]) -> String {
    push_with(
        port,
        name,
        layers,
        serde_json::json!({ "Cmd": ["/bin/app"], "Env": ["GREETING=hello", "PATH=/bin"], "WorkingDir": "/srv" }),
    )
    .await
}

/// Pushes an image of `layers` whose run config is `config` (`Cmd`, `Env`, …).
pub async fn push_with(
    port: u16,
    name: &str,
    layers: &[(Vec<u8>, String)],
    config: serde_json::Value,
) -> String {
    let reference: Reference = format!("127.0.0.1:{port}/{name}").parse().unwrap();
    let diff_ids: Vec<&str> = layers.iter().map(|(_, d)| d.as_str()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let layers: Vec<ImageLayer> = layers
        .iter()
        .map(|(bytes, _)| ImageLayer::oci_v1_gzip(bytes.clone(), None))
        .collect();
    let c = client();
    c.push(
        &reference,
        &layers,
        Config::oci_v1(serde_json::to_vec(&config).unwrap(), None),
        &RegistryAuth::Anonymous,
        None,
    )
    .await
    .unwrap();
    c.fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap()
}
