//! `LocalExchange`: the ranks of one process (threads, one device each)
//! meeting in memory. Native only: it needs threads and blocking waits,
//! which the web does not have.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// An [`Exchange`] among threads of one process (one rank a device, say).
/// A rank that waits longer than the group's timeout for the others gets
/// an error, and so does every later call of the group: one failing rank
/// ends the group's collectives instead of hanging them. Each collective
/// copies to a rank only what that rank receives, and counts it
/// ([`Exchange::traffic`]) as a transport between devices would move it.
pub struct LocalExchange {
    rank: usize,
    scheme: Scheme,
    traffic: TrafficCounter,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<Round>,
    done: Condvar,
}

/// One rank's part of a collective.
#[derive(Clone)]
enum Deposit {
    /// The same bytes for every rank (an all-gather).
    Gather(Vec<u8>),
    /// A block for each rank (an all-to-all).
    Scatter(Vec<Vec<u8>>),
    /// Integers to take the maximum of.
    Max(Vec<u64>),
}

impl Deposit {
    fn name(&self) -> &'static str {
        match self {
            Deposit::Gather(_) => "an all-gather",
            Deposit::Scatter(_) => "an all-to-all",
            Deposit::Max(_) => "an all-reduce",
        }
    }
}

#[derive(Default)]
struct Round {
    /// Completed rounds so far.
    generation: u64,
    /// This round's deposits.
    slots: Vec<Option<Deposit>>,
    /// The last completed round's deposits, in rank order.
    last: Arc<Vec<Deposit>>,
    /// Why the group stopped, once a rank timed out.
    failed: Option<String>,
}

impl LocalExchange {
    /// A group of `size` ranks (hand one to each thread), whose calls
    /// give up after `timeout`.
    pub fn group(size: usize, timeout: Duration) -> Vec<LocalExchange> {
        let shared = Arc::new(Shared {
            size,
            timeout,
            state: Mutex::new(Round {
                slots: vec![None; size],
                ..Default::default()
            }),
            done: Condvar::new(),
        });
        (0..size)
            .map(|rank| LocalExchange {
                rank,
                scheme: Scheme::Auto,
                traffic: TrafficCounter::default(),
                shared: shared.clone(),
            })
            .collect()
    }

    /// Groups of any sizes out of a world of `colors.len()` ranks, as
    /// `MPI_Comm_split` makes them (PyTorch's `process_group`): world rank
    /// `i` joins the group of every rank of color `colors[i]`, ranked by
    /// world rank. The result is indexed by world rank.
    pub fn split(colors: &[usize], timeout: Duration) -> Vec<LocalExchange> {
        let mut distinct: Vec<usize> = colors.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut out: Vec<Option<LocalExchange>> = (0..colors.len()).map(|_| None).collect();
        for color in distinct {
            let members: Vec<usize> = (0..colors.len()).filter(|&i| colors[i] == color).collect();
            for (world, exchange) in members.into_iter().zip(LocalExchange::group(
                colors.iter().filter(|&&c| c == color).count(),
                timeout,
            )) {
                out[world] = Some(exchange);
            }
        }
        out.into_iter()
            .map(|e| e.expect("every world rank has a color"))
            .collect()
    }

    /// This rank asks for `scheme` (every rank of the group must ask for
    /// the same one).
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Deposits this rank's part of a collective and returns every rank's,
    /// once all have deposited theirs.
    fn collective(&self, deposit: Deposit) -> Result<Arc<Vec<Deposit>>> {
        let shared = &*self.shared;
        let deadline = Instant::now() + shared.timeout;
        let mut round = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let fail =
            |round: &Round| Error::exchange(ExchangeFailure::RankFailed, round.failed.clone().unwrap_or_default());
        if round.failed.is_some() {
            return Err(fail(&round));
        }
        // a rank a whole round ahead waits for the others to finish this one
        // (it cannot be: its deposit of the round is still there)
        while round.slots[self.rank].is_some() {
            round = wait(shared, round, deadline, self.rank)?;
        }
        let generation = round.generation;
        let mine = deposit.name();
        round.slots[self.rank] = Some(deposit);
        if round.slots.iter().all(Option::is_some) {
            round.last = Arc::new(round.slots.iter_mut().map(|s| s.take().expect("every slot")).collect());
            round.generation += 1;
            shared.done.notify_all();
        }
        while round.generation == generation {
            round = wait(shared, round, deadline, self.rank)?;
        }
        // at most one round completes without this rank: this one
        let all = round.last.clone();
        drop(round);
        if let Some((r, other)) = all.iter().enumerate().find(|(_, d)| d.name() != mine) {
            return Err(Error::exchange(
                ExchangeFailure::Mismatch,
                format!(
                    "rank {r} called {} where rank {} called {mine}",
                    other.name(),
                    self.rank
                ),
            ));
        }
        Ok(all)
    }
}

impl Exchange for LocalExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.collective(Deposit::Gather(local.to_vec()))?;
        let out: Vec<Vec<u8>> = all
            .iter()
            .map(|d| match d {
                Deposit::Gather(b) => b.clone(),
                _ => unreachable!("checked by collective"),
            })
            .collect();
        self.traffic
            .all_gather(self.rank, local.len(), out.iter().map(Vec::len));
        Ok(out)
    }

    fn all_to_all(&self, blocks: &[&[u8]], lengths: &[usize]) -> Result<Vec<Vec<u8>>> {
        check_blocks(self, blocks, lengths)?;
        let all = self.collective(Deposit::Scatter(blocks.iter().map(|b| b.to_vec()).collect()))?;
        let out: Vec<Vec<u8>> = all
            .iter()
            .map(|d| match d {
                Deposit::Scatter(b) => b.get(self.rank).cloned().unwrap_or_default(),
                _ => unreachable!("checked by collective"),
            })
            .collect();
        let sent: Vec<usize> = blocks.iter().map(|b| b.len()).collect();
        let received: Vec<usize> = out.iter().map(Vec::len).collect();
        self.traffic.all_to_all(self.rank, &sent, &received);
        check_received(&out, lengths)?;
        Ok(out)
    }

    fn all_reduce_max(&self, values: &[u64]) -> Result<Vec<u64>> {
        let all = self.collective(Deposit::Max(values.to_vec()))?;
        let mut max = values.to_vec();
        for (rank, d) in all.iter().enumerate() {
            let Deposit::Max(theirs) = d else {
                unreachable!("checked by collective")
            };
            if theirs.len() != values.len() {
                return Err(Error::exchange(
                    ExchangeFailure::Mismatch,
                    format!(
                        "rank {rank} reduced {} values, rank {} {}",
                        theirs.len(),
                        self.rank,
                        values.len()
                    ),
                ));
            }
            for (m, &v) in max.iter_mut().zip(theirs) {
                *m = (*m).max(v);
            }
        }
        self.traffic.all_reduce(self.size(), values.len());
        Ok(max)
    }

    fn scheme(&self) -> Scheme {
        self.scheme
    }

    fn traffic(&self) -> Option<Traffic> {
        Some(self.traffic.read())
    }
}

/// Waits for a change of the group's round, or fails the group at the deadline.
fn wait<'a>(
    shared: &'a Shared,
    round: std::sync::MutexGuard<'a, Round>,
    deadline: Instant,
    rank: usize,
) -> Result<std::sync::MutexGuard<'a, Round>> {
    let left = deadline.saturating_duration_since(Instant::now());
    let (mut round, _) = shared.done.wait_timeout(round, left).unwrap_or_else(|e| e.into_inner());
    if let Some(why) = &round.failed {
        return Err(Error::exchange(ExchangeFailure::RankFailed, why.clone()));
    }
    if Instant::now() >= deadline {
        let missing: Vec<usize> = (0..shared.size).filter(|&r| round.slots[r].is_none()).collect();
        let why = format!(
            "rank {rank} waited {:?} for ranks {missing:?} of {}: a rank failed or stopped calling",
            shared.timeout, shared.size
        );
        round.failed = Some(why.clone());
        shared.done.notify_all();
        return Err(Error::exchange(ExchangeFailure::RankFailed, why));
    }
    Ok(round)
}

/// An exchange with only `all_gather` (and the scheme): the trait's
/// defaults do the rest, for tests that hold them to the local
/// collectives.
#[cfg(test)]
pub(crate) struct GatherOnly(pub LocalExchange);

#[cfg(test)]
impl Exchange for GatherOnly {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.0.all_gather(local)
    }
    fn scheme(&self) -> Scheme {
        self.0.scheme()
    }
}
