//! Data parallelism across processes: the few collectives memgen needs (rank, size, sum
//! all-reduce over f32, broadcast, barrier), one process by default, MPI behind the `mpi` feature.
//!
//! The process group is process-global, as MPI is: [`init`] runs once at the top of the CLI
//! (before any thread pool exists) and returns a [`Session`] whose drop shuts MPI down; everything
//! else reaches the group through [`world`]. A library caller that never calls [`init`] gets the
//! single-process group, so tests and embedders see exactly the one-process behaviour.
//!
//! Launchers: `mpirun -np N memgen …` (OpenMPI, MPICH) or Slurm's `srun` (with PMI/PMIx). A build
//! without the feature that finds itself launched as one of N > 1 ranks refuses to start
//! ([`Error::NotBuiltWithMpi`]): N independent copies would otherwise race on one output directory.
//!
//! Failure: an error on any rank ends every rank ([`World::abort`], MPI_Abort), so no rank waits
//! forever in a collective its peer will never reach. Stops on a signal are agreed collectively
//! ([`World::any`]) so all ranks stop after the same step.

#[cfg(feature = "mpi")]
mod mpi_backend;
mod ranks;
pub mod shard;

pub(crate) use ranks::Ranks;

use std::sync::OnceLock;

/// What can go wrong setting up or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Launched by an MPI launcher as one of several ranks, but built without MPI.
    #[error(
        "launched as one of {size} ranks (by {launcher}), but this memgen was built without the `mpi` feature; rebuild it with `cargo build --release --features mpi` (needs OpenMPI: openmpi-bin libopenmpi-dev libclang-dev pkgconf), or run one process"
    )]
    NotBuiltWithMpi {
        rank: usize,
        size: usize,
        launcher: &'static str,
    },
    /// MPI_Init failed or MPI was already initialised by someone else.
    #[error(
        "MPI could not be initialised (already initialised, or the launcher environment is broken)"
    )]
    Init,
    /// MPI was initialised twice in one process.
    #[error("the process group is already initialised")]
    AlreadyInitialised,
    /// A collective was called from a thread other than the one that initialised MPI (memgen
    /// asks MPI for `MPI_THREAD_FUNNELED` only).
    #[error("an MPI collective was called off the main thread")]
    WrongThread,
    /// The ranks hold different values of something that must be the same everywhere.
    #[error("the ranks disagree on {what} (rank 0: {root}, this rank {rank}: {mine}); launch every rank with the same command and data")]
    Disagree {
        what: &'static str,
        rank: usize,
        root: String,
        mine: String,
    },
    /// A buffer does not fit in one MPI message (counts are C ints).
    #[error("a collective buffer of {0} elements is larger than MPI's count limit")]
    TooLarge(usize),
}

/// The process group: this process's rank, the number of ranks, and the collectives.
pub struct World {
    rank: usize,
    size: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    comm: Option<mpi_backend::Comm>,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The process group [`init`] set up, or the single-process one.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Keeps MPI alive; dropping it (at the end of `main`) finalises MPI. A no-op for one process.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi_backend::Universe>,
}

/// A multi-rank launch seen in the environment launchers set (OpenMPI; MPICH/Hydra, Intel MPI
/// and Slurm's PMI2 through PMI; MVAPICH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
}

/// How this process was launched, when as one of N > 1 ranks.
pub fn launched_as() -> Option<Launch> {
    const VARS: [(&str, &str, &str); 3] = [
        (
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_RANK",
            "OpenMPI's mpirun",
        ),
        (
            "PMI_SIZE",
            "PMI_RANK",
            "a PMI launcher (mpiexec, srun --mpi=pmi2)",
        ),
        (
            "MV2_COMM_WORLD_SIZE",
            "MV2_COMM_WORLD_RANK",
            "MVAPICH's mpirun",
        ),
    ];
    let num = |var: &str| -> Option<usize> { std::env::var(var).ok()?.trim().parse().ok() };
    VARS.iter().find_map(|(size, rank, launcher)| {
        let size = num(size).filter(|&n| n > 1)?;
        Some(Launch {
            launcher,
            rank: num(rank).unwrap_or(0),
            size,
        })
    })
}

/// Set up the process group for this process: MPI when the `mpi` feature is built in and a
/// launcher started several ranks, one process otherwise. Refuses ([`Error::NotBuiltWithMpi`])
/// a multi-rank launch of a build without MPI. Call once, before any thread pool starts.
pub fn init() -> Result<Session, Error> {
    #[cfg(feature = "mpi")]
    {
        if launched_as().is_some() {
            let (universe, world) = mpi_backend::init()?;
            WORLD.set(world).map_err(|_| Error::AlreadyInitialised)?;
            return Ok(Session {
                _universe: Some(universe),
            });
        }
    }
    #[cfg(not(feature = "mpi"))]
    if let Some(l) = launched_as() {
        return Err(Error::NotBuiltWithMpi {
            rank: l.rank,
            size: l.size,
            launcher: l.launcher,
        });
    }
    WORLD
        .set(World::single())
        .map_err(|_| Error::AlreadyInitialised)?;
    Ok(Session {
        #[cfg(feature = "mpi")]
        _universe: None,
    })
}

impl World {
    fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_size: 1,
            #[cfg(feature = "mpi")]
            comm: None,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0 alone writes checkpoints, metrics, answers and progress output.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Ranks sharing this node (its cores).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Kernel threads for this rank when `--threads` is not given: the node's cores shared
    /// evenly by its ranks (at least one), so N ranks on one machine do not oversubscribe it.
    pub fn default_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.local_size.max(1)).max(1)
    }

    /// Sum `buf` elementwise over all ranks, in place; every rank ends with the same sums.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), Error> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.all_reduce_sum(buf);
        }
        let _ = buf;
        Ok(())
    }

    /// [`World::all_reduce_sum`] in f64 (logged sums, validation totals).
    pub fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), Error> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.all_reduce_sum(buf);
        }
        let _ = buf;
        Ok(())
    }

    /// Overwrite `buf` on every rank with rank `root`'s (the lengths must match).
    pub fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), Error> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.broadcast(buf, root);
        }
        let _ = (buf, root);
        Ok(())
    }

    /// Overwrite `bytes` on every rank with rank `root`'s; the length travels first, so the
    /// other ranks need not know it.
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<(), Error> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.broadcast_bytes(bytes, root);
        }
        let _ = (bytes, root);
        Ok(())
    }

    /// Overwrite `value` on every rank with rank `root`'s, sent as JSON.
    pub fn broadcast_json<T>(&self, value: &mut T, root: usize) -> anyhow::Result<()>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        if self.size == 1 {
            return Ok(());
        }
        let mut bytes = if self.rank == root {
            serde_json::to_vec(value)?
        } else {
            vec![]
        };
        self.broadcast_bytes(&mut bytes, root)?;
        if self.rank != root {
            *value = serde_json::from_slice(&bytes)?;
        }
        Ok(())
    }

    /// Every rank's `bytes`, in rank order (an all-gather built on [`World::broadcast_bytes`]:
    /// its callers move a few kilobytes per batch).
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        (0..self.size)
            .map(|r| {
                let mut b = if r == self.rank {
                    bytes.to_vec()
                } else {
                    vec![]
                };
                self.broadcast_bytes(&mut b, r)?;
                Ok(b)
            })
            .collect()
    }

    /// Wait until every rank arrives.
    pub fn barrier(&self) -> Result<(), Error> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.barrier();
        }
        Ok(())
    }

    /// Is `flag` set on any rank? Used to agree on stopping (a signal may reach one rank only,
    /// or reach them between two different steps).
    pub fn any(&self, flag: bool) -> Result<bool, Error> {
        let mut b = [f32::from(u8::from(flag))];
        self.all_reduce_sum(&mut b)?;
        Ok(b[0] > 0.0)
    }

    /// The signal that asked the run to stop on any rank (the lowest rank's, when several
    /// did), adopted by every rank ([`crate::signals::adopt`]) so all stop at this same point.
    /// Every rank must call it at the same point of the run. One process: its own signal, with no
    /// communication.
    pub fn agree_on_signal(&self) -> Result<Option<i32>, Error> {
        let mine = crate::signals::requested();
        if self.size == 1 {
            return Ok(mine);
        }
        let mut slots = vec![0f32; self.size];
        slots[self.rank] = mine.unwrap_or(0) as f32;
        self.all_reduce_sum(&mut slots)?;
        let agreed = slots.iter().find(|&&s| s > 0.0).map(|&s| s as i32);
        if let Some(sig) = agreed {
            crate::signals::adopt(sig);
        }
        Ok(agreed.or(mine))
    }

    /// Check that every rank holds the same `value` of `what` (as rank 0 does).
    pub fn check_same(&self, what: &'static str, value: &str) -> Result<(), Error> {
        if self.size == 1 {
            return Ok(());
        }
        let mut root = value.as_bytes().to_vec();
        self.broadcast_bytes(&mut root, 0)?;
        // Every rank learns whether any disagrees, so all fail together rather than some waiting.
        let differs = root != value.as_bytes();
        if self.any(differs)? {
            return Err(Error::Disagree {
                what,
                rank: self.rank,
                root: String::from_utf8_lossy(&root).into_owned(),
                mine: value.to_string(),
            });
        }
        Ok(())
    }

    /// End every rank now with `code` (MPI_Abort); a plain exit for one process. The CLI calls it
    /// after printing an error, so ranks waiting in a collective for this one do not hang.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.abort(code);
        }
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_single_process_group_is_the_identity() {
        let w = World::single();
        assert_eq!((w.rank(), w.size(), w.is_root()), (0, 1, true));
        let mut v = [1.5f32, -2.0];
        w.all_reduce_sum(&mut v).unwrap();
        w.broadcast(&mut v, 0).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(w.all_gather_bytes(b"abc").unwrap(), vec![b"abc".to_vec()]);
        assert!(w.any(true).unwrap() && !w.any(false).unwrap());
        w.check_same("x", "y").unwrap();
        assert!(w.default_threads() >= 1);
    }
}
