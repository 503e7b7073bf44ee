//! The MPI example under `mpiexec` with 1 to 4 ranks (issue 11): each run
//! trains a synchronized layer across processes on this machine's adapter
//! and checks every rank against the float64 reference over the global
//! batch; ranks whose layers differ must all fail at once.
//!
//! Needs the `mpi` feature (the example is built with it) and MPICH: the
//! README's test command (scripts/test.sh) installs it and passes
//! `--features mpi`. Without them these tests fail saying so; they never
//! skip.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const INSTALL: &str = "install MPICH (`apt-get install -y mpich libmpich-dev libclang-dev`) and run the tests \
     with `--features mpi` (scripts/test.sh does both)";

fn example() -> PathBuf {
    if !cfg!(feature = "mpi") {
        panic!("the MPI tests run the sync_train example, built only with the `mpi` feature: {INSTALL}");
    }
    // target/<profile>/deps/<this test> -> target/<profile>/examples/sync_train
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("sync_train");
    assert!(path.exists(), "{} was not built: {INSTALL}", path.display());
    path
}

/// Runs `mpiexec -n ranks sync_train args`, killed after five minutes.
fn mpiexec(ranks: usize, args: &[&str]) -> Output {
    let child = Command::new("mpiexec")
        .arg("-n")
        .arg(ranks.to_string())
        .arg(example())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run mpiexec ({e}): {INSTALL}"));
    let id = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if finished.load(Ordering::Acquire) {
                return;
            }
        }
        // not yet reaped (wait_with_output has not returned): the pid is the child
        let _ = Command::new("kill").arg(id.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Release);
    watchdog.join().unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value after `key` in rank 0's line, up to the next comma.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(key).unwrap_or_else(|| panic!("no `{key}` in {line}")) + key.len();
    line[at..].split(',').next().unwrap().trim()
}

#[test]
fn synchronized_training_across_1_to_4_processes_matches_the_reference() {
    for ranks in 1..=4 {
        let out = mpiexec(ranks, &[]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{ranks} ranks: {}\n{stdout}{stderr}", out.status);
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("sync_train: ranks")).collect();
        assert_eq!(lines.len(), 1, "rank 0 prints one line:\n{stdout}");
        let line = lines[0];
        assert_eq!(field(line, "sync_train: ranks"), ranks.to_string(), "{line}");
        assert_eq!(field(line, "ranks identical:"), "yes", "{line}");
        for (key, tolerance) in [
            ("max error forward", 2e-5),
            ("gradients", 1e-4),
            ("moving statistics", 2e-5),
        ] {
            let value: f64 = field(line, key).parse().unwrap();
            assert!(value <= tolerance, "{key}: {line}");
        }
        assert!(field(line, "exchange overhead").ends_with('%'), "{line}");
    }
}

#[test]
fn processes_whose_layers_differ_all_fail_within_seconds() {
    for ranks in [2, 3] {
        let start = Instant::now();
        let out = mpiexec(ranks, &["--mismatch"]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{}\n{stdout}{}", out.status, text(&out.stderr));
        for rank in 0..ranks {
            assert!(
                stdout.contains(&format!("rank {rank}: refused")),
                "rank {rank} got no exchange error:\n{stdout}"
            );
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
    }
}
