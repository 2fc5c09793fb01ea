//! A throwaway PostgreSQL for tests: a cluster of its own per test, copied from a template
//! (initdb once per machine, kept under the temp dir), started on a free loopback port with its
//! socket in the test's temp dir, and stopped (`-m immediate`) and removed when dropped. It can
//! be stopped and started again inside a test (PostgreSQL down). PostgreSQL refuses to run as
//! root: as root, every server command runs as `nobody` (`runuser`), which owns the data dir.
//! The binaries: `$CALLOUT_PG_BIN`, else the newest /usr/lib/postgresql/*/bin, else /usr/local/bin
//! (.ci/run installs Debian's postgresql when none is there).
use crate::support::TempDir;
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The database every cluster has, and its superuser.
pub const DATABASE: &str = "callout";
const USER: &str = "callout";

pub struct Postgres {
    dir: TempDir,
    pub port: u16,
    running: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CALLOUT_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| PathBuf::from("/usr/local/bin"))
}

/// `nobody`'s uid and gid when we are root (PostgreSQL will not run as root).
fn run_as() -> Option<(u32, u32)> {
    static AS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *AS.get_or_init(|| {
        let id = |flag: &str, who: Option<&str>| -> Option<u32> {
            let out = Command::new("id").arg(flag).args(who).output().ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        };
        (id("-u", None)? == 0).then(|| Some((id("-u", Some("nobody"))?, id("-g", Some("nobody"))?))).flatten()
    })
}

/// A server command, as `nobody` when we are root.
fn command(program: &str) -> Command {
    let path = bin_dir().join(program);
    match run_as() {
        Some(_) => {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(path);
            c
        }
        None => Command::new(path),
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn give_to_server(path: &Path) {
    if let Some((uid, gid)) = run_as() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The template cluster (with the `callout` database), made once per machine.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        // One per set of binaries (a new PostgreSQL gets a template of its own).
        let bins: String = bin_dir()
            .display()
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let base = std::env::temp_dir().join(format!("callout-it-pg-template{bins}"));
        let data = base.join("data");
        if data.join("PG_VERSION").exists() && base.join("ready").exists() {
            return data;
        }
        // Made aside and renamed into place, so concurrent test runs never see half of one.
        let making = std::env::temp_dir().join(format!("callout-it-pg-making-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&making);
        std::fs::create_dir_all(&making).unwrap();
        give_to_server(&making);
        let mut init = command("initdb");
        init.arg("-D").arg(making.join("data")).args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"]);
        run(init, "initdb");
        let port = free_port();
        start_server(&making, port);
        let mut create = command("createdb");
        create.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER, DATABASE]);
        run(create, "createdb");
        stop_server(&making, "fast");
        std::fs::write(making.join("ready"), b"").unwrap();
        let _ = std::fs::remove_dir_all(&base);
        if std::fs::rename(&making, &base).is_err() {
            // Another run put one in place first.
            let _ = std::fs::remove_dir_all(&making);
        }
        data
    })
}

fn start_server(dir: &Path, port: u16) {
    let mut start = command("pg_ctl");
    start
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-l")
        .arg(dir.join("log"))
        .args(["-w", "-t", "60", "-o"])
        .arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=60",
            dir.display()
        ))
        .arg("start");
    let out = start.output().unwrap();
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        panic!("pg_ctl start failed: {}\n{log}", String::from_utf8_lossy(&out.stderr));
    }
}

fn stop_server(dir: &Path, mode: &str) {
    let mut stop = command("pg_ctl");
    stop.arg("-D").arg(dir.join("data")).args(["-w", "-m", mode, "stop"]);
    let _ = stop.output();
}

impl Postgres {
    /// A running cluster of its own with an empty `callout` database.
    pub fn start() -> Self {
        let template = template();
        let dir = TempDir::new("pg");
        give_to_server(&dir.0);
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(template).arg(dir.0.join("data"));
        run(copy, "copying the template cluster");
        let mut pg = Self { dir, port: free_port(), running: false };
        pg.resume();
        pg
    }

    /// `postgres://callout@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A new empty database; its URL.
    pub fn create_database(&self, name: &str) -> String {
        let mut create = command("createdb");
        create.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, name]);
        run(create, "createdb");
        self.url(name)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        stop_server(&self.dir.0, "fast");
        self.running = false;
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) {
        start_server(&self.dir.0, self.port);
        self.running = true;
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            stop_server(&self.dir.0, "immediate");
        }
    }
}
