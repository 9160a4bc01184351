//! Sandboxing: each deployment's workloads run as an unprivileged user of
//! their own, in their own PID, mount, IPC and UTS namespaces, with a private
//! `/proc` and `/tmp`, no new privileges, and cgroup limits.
//!
//! The platform runs as root; the sandbox is entered through a small helper
//! (`commons __sandbox ...`, see [`helper_main`]) that:
//! 1. puts itself in the component's cgroups (v1 or v2) and writes the limits;
//! 2. joins its site's network namespace ([`crate::net`]), unshares the
//!    other namespaces and forks an init (PID 1 of the new PID
//!    namespace) that mounts a fresh `/proc` and a private `/tmp`;
//! 3. the init forks the workload, which drops to the deployment's user,
//!    sets no-new-privileges and rlimits, and executes the command; the init
//!    reaps orphans, records how the workload ended (exit status, signal,
//!    whether the OOM killer struck, see [`crate::exit`]) and exits with the
//!    workload's status. It dies with the helper outside (`PR_SET_PDEATHSIG`),
//!    and the namespace with it.
//!
//! On by default as root (`COMMONS_SANDBOX=0` or `[runtime] sandbox = false`
//! turns it off). Not covered yet: a read-only root filesystem, seccomp.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// First uid handed to deployments; each gets the next free one.
pub const FIRST_UID: u32 = 200_000;

/// Whether workloads are sandboxed (as root unless `COMMONS_SANDBOX=0` or
/// `[runtime] sandbox = false`).
pub fn enabled() -> bool {
    crate::settings::current().sandboxed
}

/// Whether the platform is one person's (`COMMONS_SINGLE_USER=1`): the
/// explicit, unsafe switch that lets sites from the API and the console run
/// unsandboxed, as the platform's own user. Without it and without the
/// sandbox, the platform takes sites from its administrator only.
pub fn single_user() -> bool {
    crate::settings::current().single_user
}

/// Where a deployment's uid is kept: in its own directory (root's, which
/// its workloads cannot write), so finding it costs the same with 10 or
/// 50,000 deployments, and it goes when the deployment is destroyed (a new
/// deployment of the same name gets a new user, owning nothing of the old).
fn uid_file(home: &Path, deployment: &str) -> std::path::PathBuf {
    home.join("deployments").join(deployment).join("uid")
}

/// A number kept alone in a file.
fn read_number(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

/// The uid a deployment was given, if it was.
pub fn recorded_uid(home: &Path, deployment: &str) -> Option<u32> {
    if let Some(uid) = read_number(&uid_file(home, deployment)) {
        return Some(uid);
    }
    // Kept whole in one file by earlier versions, until the next
    // allocation moves each deployment's into its directory.
    legacy_uids(home).and_then(|m| m.get(deployment).copied())
}

fn legacy_uids(home: &Path) -> Option<std::collections::BTreeMap<String, u32>> {
    std::fs::read(home.join("uids.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The uid (and gid) of a deployment, allocated once (the next of
/// `COMMONS_HOME/uids.next`, under a lock) and kept in its directory.
pub fn uid_for(home: &Path, deployment: &str) -> std::io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let file = uid_file(home, deployment);
    if let Some(uid) = read_number(&file) {
        return Ok(uid);
    }
    std::fs::create_dir_all(home)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.join("uids.lock"))?;
    // SAFETY: flock on a descriptor `lock` owns for the whole call.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    migrate_legacy_uids(home)?;
    if let Some(uid) = read_number(&file) {
        return Ok(uid);
    }
    let next_file = home.join("uids.next");
    let uid = read_number(&next_file).unwrap_or(FIRST_UID);
    crate::layout::write_whole(&next_file, (uid + 1).to_string().as_bytes())?;
    std::fs::create_dir_all(file.parent().expect("a deployment directory"))?;
    crate::layout::write_whole(&file, uid.to_string().as_bytes())?;
    Ok(uid)
}

/// Moves `uids.json` (every uid in one file, read whole per look-up) into
/// the deployments' directories, once; the next uid continues after the
/// highest ever given. Called under the uids lock.
fn migrate_legacy_uids(home: &Path) -> std::io::Result<()> {
    let Some(map) = legacy_uids(home) else {
        return Ok(());
    };
    for (deployment, uid) in &map {
        let dir = home.join("deployments").join(deployment);
        if dir.is_dir() {
            crate::layout::write_whole(&dir.join("uid"), uid.to_string().as_bytes())?;
        }
    }
    let next = map.values().max().map_or(FIRST_UID, |m| m + 1);
    let next_file = home.join("uids.next");
    let known = read_number(&next_file).unwrap_or(FIRST_UID);
    crate::layout::write_whole(&next_file, next.max(known).to_string().as_bytes())?;
    std::fs::rename(home.join("uids.json"), home.join("uids.json.migrated"))
}

/// Hands `dir` (not recursively) to `uid`, mode 0700.
pub fn give(dir: &Path, uid: u32) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::chown(c.as_ptr(), uid, uid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Hands a whole tree to `uid` (restored files).
pub fn give_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let c = CString::new(d.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: as above; lchown does not follow a link out of the tree.
        if unsafe { libc::lchown(c.as_ptr(), uid, uid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if d.is_dir() && !d.is_symlink() {
            for e in std::fs::read_dir(&d)?.flatten() {
                todo.push(e.path());
            }
        }
    }
    Ok(())
}

/// Lets other users pass through (not list) every directory from `home`
/// down to `dir` (mode 0711), so a workload can reach its own data
/// directory and nothing else: what the platform keeps beside it is 0700 or
/// 0600.
pub fn traversable(home: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut at = dir.to_path_buf();
    loop {
        let mode = std::fs::metadata(&at)?.permissions().mode() & 0o777;
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode | 0o711))?;
        }
        if at == home || !at.pop() || !at.starts_with(home) {
            return Ok(());
        }
    }
}

/// Limits for one workload's cgroup.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub pids: Option<u64>,
}

/// Where one workload is confined: its deployment's user, host name and
/// network namespace (its site's, see [`crate::net`]), its cgroup and limits.
#[derive(Debug, Clone)]
pub struct Confinement<'a> {
    pub uid: u32,
    pub hostname: &'a str,
    pub netns: &'a Path,
    pub cgroup: &'a str,
    pub limits: Limits,
}

/// Arguments for the helper: everything after `__sandbox`. `keep` are the
/// directories the workload needs (its deployment's files, its working
/// directory): if they are under `/tmp`, they stay visible through the
/// private `/tmp`.
pub fn helper_args(
    confinement: &Confinement,
    keep: &[&Path],
    exit_file: Option<&Path>,
    command: &str,
) -> Vec<String> {
    let Confinement {
        uid,
        hostname,
        netns,
        cgroup,
        limits,
    } = confinement;
    let mut a = vec![
        "--uid".into(),
        uid.to_string(),
        "--hostname".into(),
        hostname.to_string(),
        "--netns".into(),
        netns.display().to_string(),
        "--cgroup".into(),
        cgroup.to_string(),
    ];
    for k in keep {
        a.extend(["--keep".into(), k.display().to_string()]);
    }
    if let Some(m) = limits.memory_bytes {
        a.extend(["--memory".into(), m.to_string()]);
    }
    if let Some(c) = limits.cpu_millis {
        a.extend(["--cpu-millis".into(), c.to_string()]);
    }
    if let Some(p) = limits.pids {
        a.extend(["--pids".into(), p.to_string()]);
    }
    if let Some(f) = exit_file {
        a.extend(["--exit-file".into(), f.display().to_string()]);
    }
    a.extend(["--".into(), "/bin/sh".into(), "-c".into(), command.into()]);
    a
}

/// Arguments for the helper as a keeper only (no sandbox): it runs `argv`,
/// waits for it and records how it ended in `exit_file`. `watch` is a
/// cgroup someone else confines it in (a container's, made by its runtime)
/// and that cgroup's memory limit, for telling an OOM kill.
pub fn keeper_args(
    exit_file: &Path,
    argv: &[&str],
    watch: Option<(&str, Option<u64>)>,
) -> Vec<String> {
    let mut a = vec![
        "--plain".into(),
        "--exit-file".into(),
        exit_file.display().to_string(),
    ];
    if let Some((cgroup, memory)) = watch {
        a.extend(["--cgroup".into(), cgroup.to_string()]);
        if let Some(m) = memory {
            a.extend(["--memory".into(), m.to_string()]);
        }
    }
    a.push("--".into());
    a.extend(argv.iter().map(|s| s.to_string()));
    a
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// Puts the calling process in `commons/<cgroup>` under every controller it
/// limits, on cgroup v2 or a v1 hierarchy.
fn enter_cgroups(cgroup: &str, limits: &Limits) -> std::io::Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    let me = std::process::id().to_string();
    if root.join("cgroup.controllers").exists() {
        let dir = root.join("commons").join(cgroup);
        std::fs::create_dir_all(&dir)?;
        let _ = write(
            &root.join("commons/cgroup.subtree_control"),
            "+memory +cpu +pids",
        );
        if let Some(m) = limits.memory_bytes {
            write(&dir.join("memory.max"), &m.to_string())?;
            let _ = write(&dir.join("memory.swap.max"), "0");
        }
        if let Some(c) = limits.cpu_millis {
            write(&dir.join("cpu.max"), &format!("{} 100000", c * 100))?;
        }
        if let Some(p) = limits.pids {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        return write(&dir.join("cgroup.procs"), &me);
    }
    let v1 = |controller: &str| -> std::io::Result<PathBuf> {
        let dir = root.join(controller).join("commons").join(cgroup);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    if let Some(m) = limits.memory_bytes {
        let dir = v1("memory")?;
        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
        let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &m.to_string());
        write(&dir.join("cgroup.procs"), &me)?;
    }
    if let Some(c) = limits.cpu_millis {
        let dir = v1("cpu")?;
        write(&dir.join("cpu.cfs_period_us"), "100000")?;
        write(&dir.join("cpu.cfs_quota_us"), &(c * 100).to_string())?;
        write(&dir.join("cgroup.procs"), &me)?;
    }
    if let Some(p) = limits.pids {
        let dir = v1("pids")?;
        write(&dir.join("pids.max"), &p.to_string())?;
        write(&dir.join("cgroup.procs"), &me)?;
    }
    Ok(())
}

/// Removes a deployment's cgroups (after its processes are gone), under
/// every hierarchy. Cgroup directories go with `rmdir`, deepest first.
pub fn remove_cgroups(deployment: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.join("commons").join(deployment)];
    for controller in ["memory", "cpu", "pids"] {
        bases.push(root.join(controller).join("commons").join(deployment));
    }
    for base in bases {
        let mut dirs = Vec::new();
        let mut todo = vec![base];
        while let Some(d) = todo.pop() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                todo.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
                dirs.push(d);
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn fail(what: &str) -> ! {
    let e = std::io::Error::last_os_error();
    eprintln!("commons sandbox: {what}: {e}");
    std::process::exit(126)
}

fn exit_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Set once SIGTERM reached the keeper: the workload was asked to stop.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The keeper's SIGTERM: remember it, and pass it on to the whole group
/// once (a `kill PID` of the keeper alone stops the workload too).
extern "C" fn on_sigterm(_: libc::c_int) {
    if !STOPPING.swap(true, Ordering::SeqCst) {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(0, libc::SIGTERM);
        }
    }
}

/// Waits for `child` (retrying on EINTR) and returns its raw status.
fn wait_for(child: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: waitpid on our own child, with a valid pointer.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            fail("waitpid");
        }
    }
    status
}

/// What the keeper knows of one run, for [`record_exit`].
struct Watch<'a> {
    exit_file: Option<&'a str>,
    cgroup: &'a str,
    memory_limit: Option<u64>,
    oom_kills_before: Option<u64>,
}

impl Watch<'_> {
    /// Writes how the workload ended (`status` as `waitpid` gave it).
    fn record_exit(&self, status: libc::c_int) {
        let Some(path) = self.exit_file else {
            return;
        };
        let oom = match (self.oom_kills_before, crate::exit::oom_kills(self.cgroup)) {
            (Some(before), Some(after)) => after > before,
            // No counter to read: a SIGKILL under a memory limit is the OOM killer's.
            _ => {
                self.memory_limit.is_some()
                    && libc::WIFSIGNALED(status)
                    && libc::WTERMSIG(status) == libc::SIGKILL
            }
        };
        let record = crate::exit::ExitRecord {
            instance: std::env::var(crate::proc::INSTANCE_VAR).unwrap_or_default(),
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            oom,
            stopped: STOPPING.load(Ordering::SeqCst),
            memory_limit: self.memory_limit,
            at_ms: commons_clock::now_ms() as u64,
        };
        if let Err(e) = crate::exit::write(Path::new(path), &record) {
            eprintln!("commons: recording how the process ended: {e}");
        }
    }
}

/// The helper's `main`: `args` are those [`helper_args`] or
/// [`keeper_args`] made. Never returns.
///
/// With `--plain` it only keeps the workload: runs it as its child (killed
/// with the keeper, `PR_SET_PDEATHSIG`), waits for it and records how it
/// ended (`--exit-file`). Otherwise it sandboxes it as described above, and
/// the namespace's init is the one that waits and records.
pub fn helper_main(args: &[String]) -> ! {
    let mut uid: Option<u32> = None;
    let (mut hostname, mut cgroup) = (String::from("commons"), String::new());
    let mut limits = Limits::default();
    let mut keep: Vec<String> = Vec::new();
    let (mut plain, mut exit_file) = (false, None::<String>);
    let mut netns: Option<String> = None;
    let mut i = 0;
    while i < args.len() && args[i] != "--" {
        if args[i] == "--plain" {
            plain = true;
            i += 1;
            continue;
        }
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--uid" => uid = value.parse().ok(),
            "--hostname" => hostname = value,
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = value,
            "--memory" => limits.memory_bytes = value.parse().ok(),
            "--cpu-millis" => limits.cpu_millis = value.parse().ok(),
            "--pids" => limits.pids = value.parse().ok(),
            "--keep" => keep.push(value),
            "--exit-file" => exit_file = Some(value),
            other => {
                eprintln!("commons sandbox: unknown option {other}");
                std::process::exit(126)
            }
        }
        i += 2;
    }
    let command: Vec<CString> = args
        .get(i + 1..)
        .unwrap_or_default()
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL in arguments"))
        .collect();
    if command.is_empty() {
        eprintln!("commons sandbox: no command after --");
        std::process::exit(126)
    }
    // SAFETY: installing a handler that only touches an atomic and calls kill.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    if plain {
        keep_plain(&command, exit_file.as_deref(), &cgroup, limits.memory_bytes)
    }
    let Some(uid) = uid.filter(|u| *u >= FIRST_UID) else {
        eprintln!("commons sandbox: --uid must be at least {FIRST_UID}");
        std::process::exit(126)
    };
    if !cgroup.is_empty() {
        if let Err(e) = enter_cgroups(&cgroup, &limits) {
            eprintln!("commons sandbox: cgroup {cgroup}: {e}");
            std::process::exit(126)
        }
    }
    // The site's own network; without one, no sandbox.
    let Some(netns) = netns else {
        eprintln!("commons sandbox: --netns is required");
        std::process::exit(126)
    };
    if let Err(e) = crate::net::enter(Path::new(&netns)) {
        eprintln!("commons sandbox: joining the network namespace {netns}: {e}");
        std::process::exit(126)
    }
    let watch = Watch {
        exit_file: exit_file.as_deref(),
        cgroup: &cgroup,
        memory_limit: limits.memory_bytes,
        oom_kills_before: crate::exit::oom_kills(&cgroup),
    };
    // SAFETY: unshare and fork in the single-threaded keeper; the child
    // calls only async-signal-safe functions until it execs.
    unsafe {
        if libc::unshare(
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        ) != 0
        {
            fail("unshare");
        }
        let init = libc::fork();
        if init < 0 {
            fail("fork");
        }
        if init > 0 {
            // Outside: wait for the namespace's init and pass its status on.
            std::process::exit(exit_status(wait_for(init)));
        }
        // PID 1 of the new namespace dies with the keeper outside (and
        // takes the whole namespace with it). (Its parent is outside the
        // namespace: getppid() says 0, so there is nothing to compare.)
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The keeper outside passes a SIGTERM on to the whole group, this
        // init included: passed on again, the workload would get it twice.
        STOPPING.store(true, Ordering::SeqCst);
        // Private mounts, fresh /proc, private /tmp.
        let none = CString::new("none").expect("static");
        let slash = CString::new("/").expect("static");
        if libc::mount(
            none.as_ptr(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail("making mounts private");
        }
        let proc_ = CString::new("proc").expect("static");
        let proc_dir = CString::new("/proc").expect("static");
        if libc::mount(
            proc_.as_ptr(),
            proc_dir.as_ptr(),
            proc_.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail("mounting /proc");
        }
        // Directories under /tmp the workload needs, held open across the
        // mount that hides the rest of /tmp, then bound back in place.
        let kept: Vec<(CString, libc::c_int)> = keep
            .iter()
            .filter(|k| Path::new(k).starts_with("/tmp"))
            .filter_map(|k| {
                let c = CString::new(k.as_str()).ok()?;
                let fd = libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                );
                (fd >= 0).then_some((c, fd))
            })
            .collect();
        let tmpfs = CString::new("tmpfs").expect("static");
        let tmp = CString::new("/tmp").expect("static");
        let opts = CString::new("mode=1777,size=64m").expect("static");
        if libc::mount(
            tmpfs.as_ptr(),
            tmp.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        ) != 0
        {
            fail("mounting a private /tmp");
        }
        for (path, fd) in &kept {
            let _ = std::fs::create_dir_all(std::ffi::OsStr::from_encoded_bytes_unchecked(
                path.as_bytes(),
            ));
            let source = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
            if libc::mount(
                source.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                fail("keeping a directory under /tmp");
            }
            libc::close(*fd);
        }
        let _ = libc::sethostname(hostname.as_ptr().cast(), hostname.len());
        let workload = libc::fork();
        if workload < 0 {
            fail("fork");
        }
        if workload == 0 {
            // The workload: the deployment's user, no way back up.
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                fail("dropping privileges");
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail("no_new_privs");
            }
            let core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &core);
            let files = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &files);
            let mut argv: Vec<*const libc::c_char> = command.iter().map(|c| c.as_ptr()).collect();
            argv.push(std::ptr::null());
            libc::execv(argv[0], argv.as_ptr());
            fail("exec");
        }
        // Init: reap everything; record and leave when the workload does.
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == workload {
                watch.record_exit(status);
                std::process::exit(exit_status(status));
            }
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                std::process::exit(1);
            }
        }
    }
}

/// `--plain`: run `command` as a child that dies with us, wait, record.
fn keep_plain(
    command: &[CString],
    exit_file: Option<&str>,
    cgroup: &str,
    memory_limit: Option<u64>,
) -> ! {
    let watch = Watch {
        exit_file,
        cgroup,
        memory_limit,
        // A container's cgroup is its runtime's, made fresh for it after
        // this: none yet means none of its kills counted yet.
        oom_kills_before: if cgroup.is_empty() {
            None
        } else {
            Some(crate::exit::oom_kills(cgroup).unwrap_or(0))
        },
    };
    // SAFETY: the child only calls async-signal-safe functions before exec
    // (the keeper is single-threaded here anyway).
    unsafe {
        let keeper = libc::getpid();
        let child = libc::fork();
        if child < 0 {
            fail("fork");
        }
        if child == 0 {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != keeper {
                libc::_exit(1);
            }
            let mut argv: Vec<*const libc::c_char> = command.iter().map(|c| c.as_ptr()).collect();
            argv.push(std::ptr::null());
            libc::execvp(argv[0], argv.as_ptr());
            let e = std::io::Error::last_os_error();
            eprintln!("cannot start `{}`: {e}", command[0].to_string_lossy());
            libc::_exit(127);
        }
        let status = wait_for(child);
        watch.record_exit(status);
        std::process::exit(exit_status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_given_once_kept_per_deployment_and_never_reused() {
        let home = std::env::temp_dir().join(format!("commons-uids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        // An earlier version kept every uid in one file.
        std::fs::create_dir_all(home.join("deployments/old")).unwrap();
        std::fs::write(home.join("uids.json"), r#"{"old": 200007, "gone": 200009}"#).unwrap();
        assert_eq!(recorded_uid(&home, "old"), Some(200007));
        let a = uid_for(&home, "a").unwrap();
        assert_eq!(a, 200010, "after the highest ever given");
        assert!(!home.join("uids.json").exists(), "moved, once");
        assert_eq!(recorded_uid(&home, "old"), Some(200007));
        assert_eq!(uid_for(&home, "old").unwrap(), 200007);
        assert_eq!(recorded_uid(&home, "gone"), None, "its deployment is gone");
        assert_eq!(uid_for(&home, "b").unwrap(), a + 1);
        assert_eq!(uid_for(&home, "a").unwrap(), a, "given once");
        // Destroyed and made again: a new user, owning nothing of the old.
        std::fs::remove_dir_all(home.join("deployments/a")).unwrap();
        assert_eq!(recorded_uid(&home, "a"), None);
        assert_eq!(uid_for(&home, "a").unwrap(), a + 2);
        let _ = std::fs::remove_dir_all(&home);
    }
}
