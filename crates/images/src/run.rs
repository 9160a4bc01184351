//! Running an image with a real OCI runtime (runc): a bundle per instance
//! whose root is an overlay of the image's layers (read-only once the
//! runtime has made its mount points, in a writable upper of the bundle's),
//! and the runtime spec written from what the platform decided: the site's
//! own unprivileged user, its network namespace, its cgroup and limits, no
//! capabilities, no new privileges, the site's data directory and declared
//! volumes bound in.
//!
//! The overlay is mounted by the command [`Bundle::command`] gives, in a
//! mount namespace of its own, so it goes when the container does and
//! nothing is left mounted on the host.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::Pulled;

/// What the platform decided about one container.
#[derive(Debug, Clone)]
pub struct Container {
    /// The runtime's id for it: unique on the host.
    pub id: String,
    /// The program and its arguments (the image's entrypoint and command,
    /// or the blueprint's command).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// The site's user (and group).
    pub uid: u32,
    pub hostname: String,
    /// The site's network namespace (`/run/netns/…`).
    pub netns: PathBuf,
    /// The cgroup, relative to the hierarchy: `commons/DEPLOYMENT/COMPONENT`.
    pub cgroup: String,
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
    /// Host directory → path inside, read-write.
    pub binds: Vec<(PathBuf, String)>,
}

impl Container {
    /// The args and working directory an image asks for, `command`
    /// replacing its `Cmd` (its `Entrypoint` stays, as with `docker run`).
    pub fn args_of(image: &Pulled, command: Option<&[String]>) -> Vec<String> {
        let mut args = image.config.entrypoint.clone().unwrap_or_default();
        match command {
            Some(c) => args.extend(c.iter().cloned()),
            None => args.extend(image.config.cmd.clone().unwrap_or_default()),
        }
        args
    }
}

/// One instance's bundle directory: `config.json`, `rootfs/` (where the
/// overlay goes), `upper/` and `work/` (the overlay's writable side, where
/// the runtime makes mount points; the root is read-only to the app).
pub struct Bundle {
    pub dir: PathBuf,
    lowers: Vec<PathBuf>,
}

fn forbidden_in_overlay_option(p: &Path) -> bool {
    let s = p.as_os_str().as_encoded_bytes();
    s.iter().any(|b| matches!(b, b',' | b':' | b'\'' | b'\n'))
}

impl Bundle {
    /// Writes the bundle for `container` from `image`, whose layer
    /// directories are `lowers` (top first, [`crate::ImageStore::lower_dirs`]).
    pub fn prepare(
        dir: &Path,
        lowers: Vec<PathBuf>,
        image: &Pulled,
        container: &Container,
    ) -> std::io::Result<Bundle> {
        if let Some(bad) = lowers
            .iter()
            .chain(std::iter::once(&dir.to_path_buf()))
            .find(|p| forbidden_in_overlay_option(p))
        {
            return Err(std::io::Error::other(format!(
                "{} has a character overlay options cannot carry (, : ' or a new line)",
                bad.display()
            )));
        }
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["rootfs", "upper", "work"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Names the app may look up without DNS: itself and localhost (as
        // Docker and Kubernetes give every container).
        std::fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                container.hostname
            ),
        )?;
        let spec = runtime_spec(image, container, dir);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("serialises"),
        )?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            lowers,
        })
    }

    /// The command that mounts the root and runs the container in the
    /// foreground (runc passes signals on and exits with its status; it
    /// keeps the stopped container, and its cgroup with the OOM killer's
    /// count, until `runc delete`):
    /// `unshare` and `mount` from util-linux, then `runc run`.
    pub fn command(&self, runc: &Path, id: &str) -> Vec<String> {
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let d = self.dir.display();
        let script = format!(
            "mount -t overlay overlay -o 'nodev,nosuid,lowerdir={lowers},upperdir={d}/upper,workdir={d}/work' '{d}/rootfs' \
             && exec '{runc}' run --keep --bundle '{d}' '{id}'",
            lowers = lowers.join(":"),
            runc = runc.display(),
        );
        vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "/bin/sh".into(),
            "-c".into(),
            script,
        ]
    }
}

/// The OCI runtime spec for `container`.
pub fn runtime_spec(image: &Pulled, container: &Container, bundle: &Path) -> Value {
    let mut env: Vec<String> = image.config.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for (k, v) in &container.env {
        env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": bundle.join("hosts"), "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
    ];
    for (source, destination) in &container.binds {
        mounts.push(json!({
            "destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "rw", "nosuid", "nodev"],
        }));
    }
    let mut resources = json!({ "devices": [{ "allow": false, "access": "rwm" }] });
    if let Some(m) = container.memory_bytes {
        resources["memory"] = json!({ "limit": m, "swap": m });
    }
    if let Some(c) = container.cpu_millis {
        resources["cpu"] = json!({ "quota": c * 100, "period": 100_000 });
    }
    if let Some(p) = container.pids {
        resources["pids"] = json!({ "limit": p });
    }
    let none: Vec<String> = Vec::new();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": container.uid, "gid": container.uid, "additionalGids": [] },
            "args": container.args,
            "env": env,
            "cwd": container.cwd,
            "capabilities": {
                "bounding": none, "effective": none, "permitted": none,
                "inheritable": none, "ambient": none,
            },
            "rlimits": [
                { "type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096 },
                { "type": "RLIMIT_CORE", "hard": 0, "soft": 0 },
            ],
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": container.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
                { "type": "network", "path": container.netns },
            ],
            "cgroupsPath": format!("/{}", container.cgroup),
            "resources": resources,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}
