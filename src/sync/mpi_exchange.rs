//! The MPI exchange (feature `mpi`): the collectives of a synchronized
//! call over an MPI communicator, for ranks in several processes or on
//! several machines.

use std::sync::{Mutex, MutexGuard};

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};

use super::{Exchange, Scheme, Traffic, TrafficCounter, check_blocks, check_received, check_sizes};
use crate::error::{Error, ExchangeFailure, Result};

/// An [`Exchange`] over an MPI communicator: the world of
/// `mpi::initialize()`, or any group of its ranks split from it
/// (`world.split_by_color(..)`, PyTorch's `process_group`, one a node say):
/// one rank a process, each process driving its own device, on one machine
/// (`mpiexec -n 4 ./train`) or several (`mpiexec -hosts a,b -n 8 ./train`).
///
/// A synchronized call is an `MPI_Allreduce` of 13 integers (the ranks
/// agree on the call), then the scheme's collectives: one
/// `MPI_Allgatherv`, an `MPI_Alltoallv` and an `MPI_Allgatherv`, or the
/// tree's `MPI_Alltoallv` rounds, each rank sending to its neighbours
/// only. Lengths are known to every rank from the agreement: no
/// collective exchanges them. Calls are made under a lock, one at a time,
/// and counted ([`Exchange::traffic`]). Under MPI's `Single` or
/// `Funneled` threading (what `mpi::initialize()` gives), calls may only
/// come from the thread that made the exchange (make it on the thread that
/// initialised MPI): a call from another thread is an [`Error::Exchange`].
/// To use the layer from other threads, initialise MPI with
/// `mpi::initialize_with_threading(Threading::Serialized)` (or `Multiple`)
/// and make no MPI calls of your own while a layer's call runs: the lock
/// serializes this exchange's calls, not the application's.
///
/// Failures: a rank whose own call fails before the exchange still takes
/// part in the agreement (as a failed call), so the others return an error
/// at once; a rank that exits or crashes makes `mpiexec` end the whole
/// job; a rank that never calls leaves the others waiting, as any MPI
/// collective does (set `MPIEXEC_TIMEOUT`, in seconds, to bound a job).
pub struct MpiExchange {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    scheme: Scheme,
    traffic: TrafficCounter,
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
            scheme: Scheme::Auto,
            traffic: TrafficCounter::default(),
            home: std::thread::current().id(),
        }
    }

    /// This rank asks for `scheme` (every rank of the communicator must
    /// ask for the same one).
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// The communicator, once MPI may be called from this thread.
    fn comm(&self) -> Result<MutexGuard<'_, SimpleCommunicator>> {
        if !mpi::environment::is_initialized() || mpi::environment::is_finalized() {
            return Err(Error::exchange(
                ExchangeFailure::Transport,
                "MPI is not initialised, or already finalised",
            ));
        }
        if std::thread::current().id() != self.home
            && mpi::environment::threading_support() < mpi::Threading::Serialized
        {
            return Err(Error::exchange(
                ExchangeFailure::Unsupported,
                "MPI was initialised below Serialized threading: call the layer from the thread that made \
                 the MpiExchange, or initialise MPI with mpi::initialize_with_threading(Threading::Serialized)",
            ));
        }
        Ok(self.comm.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// MPI's counts and displacements of blocks of `lengths` bytes, one after
/// another, and their total.
fn layout(lengths: &[usize]) -> Result<(Vec<mpi::Count>, Vec<mpi::Count>, usize)> {
    let count = |n: usize| {
        mpi::Count::try_from(n).map_err(|_| {
            Error::exchange(
                ExchangeFailure::Transport,
                format!("{n} bytes are more than one MPI message holds"),
            )
        })
    };
    let mut counts = Vec::with_capacity(lengths.len());
    let mut displs = Vec::with_capacity(lengths.len());
    let mut total = 0usize;
    for &n in lengths {
        counts.push(count(n)?);
        displs.push(count(total)?);
        total += n;
    }
    count(total)?;
    Ok((counts, displs, total))
}

/// `all` cut into blocks of `lengths` bytes.
fn split(all: &[u8], lengths: &[usize]) -> Vec<Vec<u8>> {
    let mut at = 0;
    lengths
        .iter()
        .map(|&n| {
            at += n;
            all[at - n..at].to_vec()
        })
        .collect()
}

// SAFETY: the communicator is a handle (an integer in MPICH, a pointer in
// Open MPI). Every MPI call runs under the mutex and refuses to call MPI
// from any thread but the one that made the exchange unless MPI was
// initialised with `Serialized` threading or better, which lets any
// thread call MPI one at a time. The communicator is dropped wherever the
// exchange is: with a user communicator (freed on drop) below
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
        let comm = self.comm()?;
        let mine = local.len() as u64;
        let mut lengths = vec![0u64; self.size];
        comm.all_gather_into(&mine, &mut lengths[..]);
        let lengths: Vec<usize> = lengths.iter().map(|&n| n as usize).collect();
        let (counts, displs, total) = layout(&lengths)?;
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(local, &mut partition);
        }
        self.traffic.all_gather(self.rank, 8, vec![8; self.size]);
        self.traffic.all_gather(self.rank, local.len(), lengths.iter().copied());
        Ok(split(&all, &lengths))
    }

    fn all_gather_sized(&self, local: &[u8], lengths: &[usize]) -> Result<Vec<Vec<u8>>> {
        check_sizes(self, lengths, local.len())?;
        let (counts, displs, total) = layout(lengths)?;
        let comm = self.comm()?;
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(local, &mut partition);
        }
        self.traffic.all_gather(self.rank, local.len(), lengths.iter().copied());
        Ok(split(&all, lengths))
    }

    fn all_to_all(&self, blocks: &[&[u8]], lengths: &[usize]) -> Result<Vec<Vec<u8>>> {
        check_blocks(self, blocks, lengths)?;
        let sent: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
        let (send_counts, send_displs, _) = layout(&sent)?;
        let (counts, displs, total) = layout(lengths)?;
        let send: Vec<u8> = blocks.concat();
        let comm = self.comm()?;
        let mut all = vec![0u8; total];
        {
            let out = Partition::new(&send[..], &send_counts[..], &send_displs[..]);
            let mut into = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            comm.all_to_all_varcount_into(&out, &mut into);
        }
        self.traffic.all_to_all(self.rank, &sent, lengths);
        let out = split(&all, lengths);
        check_received(&out, lengths)?;
        Ok(out)
    }

    fn all_reduce_max(&self, values: &[u64]) -> Result<Vec<u64>> {
        let comm = self.comm()?;
        let mut max = vec![0u64; values.len()];
        comm.all_reduce_into(values, &mut max[..], SystemOperation::max());
        self.traffic.all_reduce(self.size, values.len());
        Ok(max)
    }

    fn scheme(&self) -> Scheme {
        self.scheme
    }

    fn traffic(&self) -> Option<Traffic> {
        Some(self.traffic.read())
    }
}
