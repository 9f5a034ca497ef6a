//! Python, Node and Chromium for the tests, installed on first use.
//!
//! The Python package's pinned requirements go into a venv under the target
//! directory, a Node package's lockfile into its `node_modules` (ignored by
//! git), and Debian packages (Chromium, etcd) with apt-get, so a fresh
//! machine needs only `cargo test`. Each install
//! is redone only when its requirements or lockfile change, and a file lock
//! keeps two test processes from installing at once. A machine without
//! python3 or node fails here, with a line saying what to install.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

/// The Python package's venv and the stubs generated from `proto/`.
pub struct Python {
    /// The venv's interpreter.
    pub bin: PathBuf,
    /// `interop/python`, the directory to run from.
    pub dir: PathBuf,
    /// The generated stubs' directory (holding `heartbeat/v1/*_pb2.py`).
    pub stubs: PathBuf,
}

impl Python {
    /// A command running `args` with the venv's interpreter in `interop/python`.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        command_in(&self.bin, &self.dir, args)
    }
}

/// The Node package, with its `node_modules` installed.
pub struct Node {
    /// `interop/node`, the directory to run from.
    pub dir: PathBuf,
}

impl Node {
    /// A command running `node args…` in `interop/node`.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        command_in("node", &self.dir, args)
    }
}

/// `program args…`, run in `dir`.
fn command_in<I, S>(program: impl AsRef<std::ffi::OsStr>, dir: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(program);
    command.current_dir(dir).args(args);
    command
}

fn interop(language: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(language)
}

/// Python, installed once per process (and once per requirements change).
pub fn python() -> &'static Python {
    static PYTHON: OnceLock<Python> = OnceLock::new();
    PYTHON.get_or_init(|| {
        require(
            "python3",
            "--version",
            "python3 (3.9 or newer, with venv; Debian: apt-get install python3 python3-venv)",
        );
        let dir = interop("python");
        let requirements = dir.join("requirements.txt");
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-python");
        let bin = venv.join("bin/python");
        let installed = venv.join("requirements.installed");
        let _lock = lock(&venv.with_extension("lock"));
        if !same_contents(&requirements, &installed) {
            let _ = fs::remove_dir_all(&venv);
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run(Command::new(&bin)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(&requirements));
            fs::copy(&requirements, &installed).expect("record the installed requirements");
        }
        let stubs = run(Command::new(&bin).current_dir(&dir).args([
            "-c",
            "from heartbeat_client import _stubs; print(_stubs.stubs_dir())",
        ]));
        let stubs = PathBuf::from(String::from_utf8_lossy(&stubs.stdout).trim());
        Python { bin, dir, stubs }
    })
}

/// Node, installed once per process (and once per lockfile change).
pub fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let version = require(
            "node",
            "--version",
            "Node.js 18 or newer with npm (Debian: apt-get install nodejs npm)",
        );
        let major: u32 = version
            .trim()
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0);
        assert!(
            major >= 18,
            "the interop tests need Node.js 18 or newer, found {version}"
        );
        require("npm", "--version", "npm (Debian: apt-get install npm)");
        let dir = interop("node");
        npm_ci(&dir, "interop-node");
        Node { dir }
    })
}

/// Installs `dir`'s lockfile into its `node_modules`, unless it is there.
fn npm_ci(dir: &Path, name: &str) {
    let lockfile = dir.join("package-lock.json");
    let installed = dir.join("node_modules/.installed-from-lock");
    let _lock = lock(&Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.lock")));
    if !same_contents(&lockfile, &installed) {
        run(Command::new("npm").current_dir(dir).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]));
        fs::copy(&lockfile, &installed).expect("record the installed lockfile");
    }
}

/// The browser tests' driver: Debian's Chromium, and playwright-core from
/// npm in `tests/browser`.
pub struct Browser {
    /// `tests/browser`, the directory to run the driver from.
    pub dir: PathBuf,
}

impl Browser {
    /// A command running `node driver.mjs args…` in `tests/browser`.
    pub fn driver<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = command_in("node", &self.dir, ["driver.mjs"]);
        command.args(args);
        command
    }
}

/// Chromium and playwright-core, installed once per process.
pub fn browser() -> &'static Browser {
    static BROWSER: OnceLock<Browser> = OnceLock::new();
    BROWSER.get_or_init(|| {
        node();
        debian_package("chromium", "--version", "chromium", "the browser tests");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        npm_ci(&dir, "browser");
        Browser { dir }
    })
}

/// Makes sure `program` runs, installing Debian's `package` if it does not:
/// stale package lists are refreshed once, then the install retried. Needs
/// root, as CI has; elsewhere, install the package by hand.
pub fn debian_package(program: &str, flag: &str, package: &str, needed_by: &str) {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = || {
        Command::new(program)
            .arg(flag)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if found() {
        return;
    }
    let _lock = lock(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("apt.lock"));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    let install = ["install", "-y", "-q", "--no-install-recommends", package];
    let installed = found() || apt(&install) || (apt(&["update", "-q"]) && apt(&install));
    assert!(
        installed && found(),
        "{needed_by} need {program}: install Debian's {package} (apt-get install {package})"
    );
}

/// Runs `program flag`, or fails saying what to install; returns its stdout.
fn require(program: &str, flag: &str, install: &str) -> String {
    match Command::new(program).arg(flag).output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
        _ => panic!("the interop tests need {install}; `{program} {flag}` did not run"),
    }
}

fn same_contents(a: &Path, b: &Path) -> bool {
    matches!((fs::read(a), fs::read(b)), (Ok(a), Ok(b)) if a == b)
}

/// Holds an exclusive lock on `path` until dropped.
// `File::lock` is newer than the library's MSRV; the tests run on the
// toolchain CI installs, and nothing of this reaches the library.
#[allow(clippy::incompatible_msrv)]
fn lock(path: &Path) -> File {
    let file = File::create(path).expect("create a lock file");
    file.lock().expect("lock");
    file
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("run a setup command");
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
