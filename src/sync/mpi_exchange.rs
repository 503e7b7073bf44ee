//! The MPI exchange (feature `mpi`): an all-gather over an MPI
//! communicator, for ranks in several processes or on several machines.

use std::sync::Mutex;

use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};

use super::Exchange;
use crate::error::{Error, Result};

/// An [`Exchange`] over an MPI communicator, typically the world of
/// `mpi::initialize()`: one rank a process, each process driving its own
/// device, on one machine (`mpiexec -n 4 ./train`) or several (`mpiexec
/// -hosts a,b -n 8 ./train`).
///
/// Each call is two MPI collectives (the lengths, then an `MPI_Allgatherv`
/// of the bytes), made under a lock, one at a time. Under MPI's `Single` or
/// `Funneled` threading (what `mpi::initialize()` gives), calls may only
/// come from the thread that made the exchange (make it on the thread that
/// initialised MPI): a call from another thread is an [`Error::Exchange`].
/// To use the layer from other threads, initialise MPI with
/// `mpi::initialize_with_threading(Threading::Serialized)` (or `Multiple`)
/// and make no MPI calls of your own while a layer's call runs: the lock
/// serializes this exchange's calls, not the application's.
///
/// Failures: a rank whose own call fails before the exchange still sends
/// (a failure message), so the others return an error at once; a rank
/// that exits or crashes makes `mpiexec` end the whole job; a rank that
/// never calls leaves the others waiting, as any MPI collective does (set
/// `MPIEXEC_TIMEOUT`, in seconds, to bound a job).
pub struct MpiExchange {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// The thread that made the exchange: the only one that may call MPI
    /// below `Serialized` threading.
    home: std::thread::ThreadId,
}

impl MpiExchange {
    /// An exchange among the processes of `comm`.
    pub fn new(comm: SimpleCommunicator) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        MpiExchange {
            comm: Mutex::new(comm),
            rank,
            size,
            home: std::thread::current().id(),
        }
    }
}

// SAFETY: the communicator is a handle (an integer in MPICH, a pointer in
// Open MPI). `all_gather`, the only use, runs under the mutex and refuses
// to call MPI from any thread but the one that made the exchange unless
// MPI was initialised with `Serialized` threading or better, which lets
// any thread call MPI one at a time. The communicator is dropped wherever
// the exchange is: with a user communicator (freed on drop) below
// `Serialized`, drop the exchange on the thread that made it.
unsafe impl Send for MpiExchange {}
unsafe impl Sync for MpiExchange {}

impl Exchange for MpiExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        if !mpi::environment::is_initialized() || mpi::environment::is_finalized() {
            return Err(Error::Exchange("MPI is not initialised, or already finalised".into()));
        }
        if std::thread::current().id() != self.home
            && mpi::environment::threading_support() < mpi::Threading::Serialized
        {
            return Err(Error::Exchange(
                "MPI was initialised below Serialized threading: call the layer from the thread that made \
                 the MpiExchange, or initialise MPI with mpi::initialize_with_threading(Threading::Serialized)"
                    .into(),
            ));
        }
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let count = |n: usize| {
            mpi::Count::try_from(n)
                .map_err(|_| Error::Exchange(format!("{n} bytes are more than one MPI message holds")))
        };
        let mine = local.len() as u64;
        let mut lengths = vec![0u64; self.size];
        comm.all_gather_into(&mine, &mut lengths[..]);
        let counts = lengths
            .iter()
            .map(|&n| count(n as usize))
            .collect::<Result<Vec<mpi::Count>>>()?;
        let mut displs = Vec::with_capacity(self.size);
        let mut total = 0usize;
        for &n in &lengths {
            displs.push(count(total)?);
            total += n as usize;
        }
        count(total)?;
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(local, &mut partition);
        }
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0;
        for &n in &lengths {
            out.push(all[at..at + n as usize].to_vec());
            at += n as usize;
        }
        Ok(out)
    }
}
