//! Data parallelism over MPI (docs/DESIGN.md, "Data parallelism"): `mpirun -np 2` training ends
//! with the tensors of one process over the same global batch, a 2-rank eval writes the rows of a
//! 1-rank eval, a 2-rank run resumes, and a failure on one rank ends both. These need a build
//! with `--features mpi` and OpenMPI (scripts/test.sh sets both up). The guard — a build without
//! the feature refuses a multi-rank launch — runs in every build.
//!
//! The runs use a tiny random model saved as a Hugging Face directory (with SmolLM2's tokenizer),
//! so a step takes milliseconds and the time goes to starting processes.

mod common;

#[cfg(not(feature = "mpi"))]
use std::process::Command;
use std::process::Output;

#[cfg(not(feature = "mpi"))]
fn memgen() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memgen"));
    c.args(["--threads", "1"])
        .env_remove("MEMGEN_PAUSE_AT_STEP");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_a_multi_rank_launch() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("no-such.yaml");
    let launch = |rank: &str, size: &str| {
        memgen()
            .args(["eval", "--vanilla", "--config"])
            .arg(&missing)
            .env("OMPI_COMM_WORLD_SIZE", size)
            .env("OMPI_COMM_WORLD_RANK", rank)
            .output()
            .unwrap()
    };
    // Rank 0 of 2 says why, in one line, before touching the config.
    let o = launch("0", "2");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: launched as one of 2 ranks (by OpenMPI's mpirun)")
            && err.contains("--features mpi"),
        "{err}"
    );
    // The other copies refuse silently: one line for the whole launch.
    let o = launch("1", "2");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "");
    // A group of one is a plain run: it gets as far as the missing config.
    let o = launch("0", "1");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such.yaml") && !err.contains("ranks"),
        "{err}"
    );
    // So is a PMI launch of one; PMI launches of more are refused the same way.
    let o = memgen()
        .args(["eval", "--vanilla", "--config"])
        .arg(&missing)
        .env("PMI_SIZE", "4")
        .env("PMI_RANK", "0")
        .output()
        .unwrap();
    assert!(
        stderr(&o).starts_with("error: launched as one of 4 ranks (by a PMI launcher"),
        "{}",
        stderr(&o)
    );
}

#[cfg(feature = "mpi")]
#[path = "distributed/mpi.rs"]
mod mpi;
