//! The collectives over MPI (rsmpi on the system's MPI), for the `mpi` feature.

use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;

use super::{Error, World};

pub(super) type Universe = mpi::environment::Universe;

/// `MPI_COMM_WORLD`, usable only from the thread that initialised MPI.
pub(super) struct Comm {
    world: SimpleCommunicator,
    owner: ThreadId,
}

// SAFETY: MPI is initialised with MPI_THREAD_FUNNELED, under which only the initialising thread
// may make MPI calls; every method of `Comm` first checks that it runs on that thread (`owner`)
// and fails with Error::WrongThread otherwise, so sharing the handle across threads (as the
// process-global `World` needs) never lets another thread touch MPI.
unsafe impl Send for Comm {}
// SAFETY: as for Send: all MPI access is confined to the owner thread by the check in `on_owner`.
unsafe impl Sync for Comm {}

/// Initialise MPI (funneled: memgen's collectives all run on the main thread; its compute threads
/// never call MPI) and describe this rank.
pub(super) fn init() -> Result<(Universe, World), Error> {
    let (universe, provided) =
        mpi::initialize_with_threading(Threading::Funneled).ok_or(Error::Init)?;
    if provided < Threading::Funneled {
        return Err(Error::Init);
    }
    let world = universe.world();
    let rank = world.rank() as usize;
    let size = world.size() as usize;
    // Ranks sharing this node's memory: they share its cores too (see World::default_threads).
    let local_size = world.split_shared(rank as i32).size() as usize;
    let comm = Comm {
        world,
        owner: std::thread::current().id(),
    };
    Ok((
        universe,
        World {
            rank,
            size,
            local_size,
            comm: Some(comm),
        },
    ))
}

fn count(n: usize) -> Result<i32, Error> {
    i32::try_from(n).map_err(|_| Error::TooLarge(n))
}

impl Comm {
    fn on_owner(&self) -> Result<&SimpleCommunicator, Error> {
        if std::thread::current().id() != self.owner {
            return Err(Error::WrongThread);
        }
        Ok(&self.world)
    }

    pub(super) fn all_reduce_sum<T>(&self, buf: &mut [T]) -> Result<(), Error>
    where
        T: mpi::datatype::Equivalence + Copy,
    {
        let w = self.on_owner()?;
        count(buf.len())?;
        let send = buf.to_vec();
        w.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    pub(super) fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), Error> {
        let w = self.on_owner()?;
        count(buf.len())?;
        w.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    pub(super) fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<(), Error> {
        let w = self.on_owner()?;
        let p = w.process_at_rank(root as i32);
        let mut len = [bytes.len() as u64];
        p.broadcast_into(&mut len[..]);
        let n = len[0] as usize;
        count(n)?;
        bytes.resize(n, 0);
        p.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    pub(super) fn barrier(&self) -> Result<(), Error> {
        self.on_owner()?.barrier();
        Ok(())
    }

    pub(super) fn abort(&self, code: i32) -> ! {
        // Not checked against `owner`: this is the last call of a failing process (the CLI makes
        // it on the main thread), and it has to end the job whatever state MPI is in.
        self.world.abort(code)
    }
}
