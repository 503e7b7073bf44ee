//! The MPI example under `mpiexec` (issues 11 and 20): each run trains a
//! synchronized layer across processes on this machine's adapter, in one
//! group or in groups split from the world, and checks every rank against
//! the float64 reference over its group's batch, and the bytes its
//! exchange counted against the schemes' model; ranks whose layers differ
//! must all fail at once. Every run is made twice: with MPICH's shared
//! memory between local ranks, and without it (`MPIR_CVAR_NOLOCAL=1
//! UCX_TLS=tcp,self`), the messages going through the TCP stack as they
//! would between machines.
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

use wgpu_batchnorm::sync::{Scheme, call_cost};

const INSTALL: &str = "install MPICH (`apt-get install -y mpich libmpich-dev libclang-dev`) and run the tests \
     with `--features mpi` (scripts/test.sh does both)";

/// Where the messages go: MPICH's shared memory between local ranks, or
/// TCP only (Debian's MPICH is ch4:ucx: no local shortcut, UCX over TCP).
const NETWORKS: [(&str, &[(&str, &str)]); 2] = [
    ("shared memory", &[]),
    (
        "TCP without shared memory",
        &[("MPIR_CVAR_NOLOCAL", "1"), ("UCX_TLS", "tcp,self")],
    ),
];

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

/// Runs `mpiexec -n ranks sync_train args` under `env`, killed after five minutes.
fn mpiexec(ranks: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new("mpiexec")
        .envs(env.iter().copied())
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

/// Runs the example, checks rank 0's line (tolerances, identical ranks,
/// groups that differ, the bytes the busiest rank's exchange counted
/// against the model) and returns it.
fn train(ranks: usize, args: &[&str], (network, env): (&str, &[(&str, &str)])) -> String {
    let out = mpiexec(ranks, args, env);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let at = format!("{ranks} ranks {args:?} over {network}");
    assert!(out.status.success(), "{at}: {}\n{stdout}{stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("sync_train: ranks")).collect();
    assert_eq!(lines.len(), 1, "{at}: rank 0 prints one line:\n{stdout}");
    let line = lines[0].to_string();
    let value = |key: &str| -> usize {
        field(&line, key)
            .parse()
            .unwrap_or_else(|e| panic!("{key}: {e} in {line}"))
    };
    assert_eq!(value("sync_train: ranks"), ranks, "{line}");
    assert_eq!(field(&line, "ranks identical:"), "yes", "{line}");
    for (key, tolerance) in [
        ("max error forward", 2e-5),
        ("gradients", 1e-4),
        ("moving statistics", 2e-5),
    ] {
        let value: f64 = field(&line, key).parse().unwrap();
        assert!(value <= tolerance, "{key}: {line}");
    }
    assert!(field(&line, "exchange overhead").ends_with('%'), "{line}");
    assert!(field(&line, "synchronized step").ends_with(" ms"), "{line}");
    let groups = value("groups");
    assert_eq!(
        field(&line, "groups differ:"),
        if groups == 1 { "n/a" } else { "yes" },
        "{line}"
    );
    // the busiest rank is in the largest group (consecutive ranks)
    let largest = (0..groups)
        .map(|g| (0..ranks).filter(|r| r * groups / ranks == g).count())
        .max()
        .unwrap();
    let scheme: Scheme = field(&line, "scheme").parse().unwrap();
    let cost = call_cost(scheme, largest, value("channels"));
    assert_eq!(
        value("bytes per rank per step") as u64,
        2 * cost.bytes,
        "{at}: a forward and a backward of {cost:?}: {line}"
    );
    line
}

#[test]
fn synchronized_training_across_1_to_4_processes_matches_the_reference() {
    for network in NETWORKS {
        // one rank sends nothing anywhere
        let first = if network.1.is_empty() { 1 } else { 2 };
        for ranks in first..=4 {
            train(ranks, &[], network);
        }
    }
}

/// `--groups`: a world split into groups (MPI_Comm_split), each
/// synchronizing over its own ranks and batch: each group matches the
/// reference over its own batch, and the groups' states differ.
#[test]
fn groups_split_from_the_world_each_match_their_own_batch() {
    for network in NETWORKS {
        let line = train(4, &["--groups", "2"], network);
        assert!(line.contains("groups 2,"), "{line}");
    }
    // groups of two and one, the pair over the tree
    train(3, &["--groups", "2", "--scheme", "tree"], NETWORKS[0]);
}

/// The bytes a rank moves per call stay O(channels) with the rank count
/// (below four times its payload, 24 bytes a channel, plus the agreement),
/// where the all-gather's grow with it; every scheme runs over MPI's
/// collectives, each counting what the model says.
#[test]
fn bytes_per_rank_stay_o_of_channels_as_ranks_grow() {
    let bound = 2 * (4 * 24 * 2048 + 208);
    for ranks in 2..=4 {
        let line = train(ranks, &["--channels", "2048"], NETWORKS[0]);
        let bytes: u64 = field(&line, "bytes per rank per step").parse().unwrap();
        assert!(bytes <= bound, "{line}");
    }
    let gathered = train(4, &["--channels", "2048", "--scheme", "all-gather"], NETWORKS[0]);
    let bytes: u64 = field(&gathered, "bytes per rank per step").parse().unwrap();
    assert!(
        bytes > 2 * call_cost(Scheme::Auto, 4, 2048).bytes * 19 / 10,
        "{gathered}"
    );
    for network in NETWORKS {
        train(4, &["--scheme", "tree"], network);
        train(3, &["--scheme", "reduce-scatter", "--channels", "2"], network);
    }
}

#[test]
fn processes_whose_layers_differ_all_fail_within_seconds() {
    for (network, env) in NETWORKS {
        for ranks in [2, 3] {
            let start = Instant::now();
            let out = mpiexec(ranks, &["--mismatch"], env);
            let stdout = text(&out.stdout);
            assert!(
                out.status.success(),
                "{network}: {}\n{stdout}{}",
                out.status,
                text(&out.stderr)
            );
            for rank in 0..ranks {
                assert!(
                    stdout.contains(&format!("rank {rank}: refused")),
                    "{network}: rank {rank} got no exchange error:\n{stdout}"
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{network}: {:?}",
                start.elapsed()
            );
        }
    }
}
