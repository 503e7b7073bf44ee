//! Synchronized statistics, the transport-independent part: the
//! [`Exchange`] a synchronized layer all-gathers its per-channel moments
//! and gradient sums through, an in-process exchange for several devices
//! (threads) of one process, and the checked message every rank sends.
//! [`crate::BatchNorm::set_exchange`] synchronizes a GPU layer; the float64
//! reference's synchronized calls
//! ([`crate::reference::ReferenceLayer::forward_synchronized`]) take one
//! per call. The MPI exchange is behind the `mpi` feature.

#[cfg(feature = "mpi")]
mod mpi_exchange;
#[cfg(feature = "mpi")]
pub use mpi_exchange::MpiExchange;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A collective all ranks of a synchronized layer call together: the
/// application can implement it over its own transport.
pub trait Exchange: Send + Sync {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn size(&self) -> usize;
    /// Every rank's bytes, in rank order (this rank's own among them).
    /// Blocks until every rank has called it; ranks may send different
    /// lengths. Every rank must make the same sequence of calls: a rank
    /// that fails must make the others fail (an error, or a timeout),
    /// never leave them waiting for ever.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// An [`Exchange`] among threads of one process (one rank a device, say).
/// A rank that waits longer than the group's timeout for the others gets
/// an error, and so does every later call of the group: one failing rank
/// ends the group's collectives instead of hanging them.
pub struct LocalExchange {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<Round>,
    done: Condvar,
}

#[derive(Default)]
struct Round {
    /// Completed rounds so far.
    generation: u64,
    /// This round's deposits.
    slots: Vec<Option<Vec<u8>>>,
    /// The last completed round's bytes, in rank order.
    last: Arc<Vec<Vec<u8>>>,
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
                shared: shared.clone(),
            })
            .collect()
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
        let shared = &*self.shared;
        let deadline = Instant::now() + shared.timeout;
        let mut round = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let fail = |round: &Round| Error::Exchange(round.failed.clone().unwrap_or_default());
        if round.failed.is_some() {
            return Err(fail(&round));
        }
        // a rank a whole round ahead waits for the others to finish this one
        // (it cannot be: its deposit of the round is still there)
        while round.slots[self.rank].is_some() {
            round = wait(shared, round, deadline, self.rank)?;
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(local.to_vec());
        if round.slots.iter().all(Option::is_some) {
            round.last = Arc::new(round.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect());
            round.generation += 1;
            shared.done.notify_all();
        }
        while round.generation == generation {
            round = wait(shared, round, deadline, self.rank)?;
        }
        // at most one round completes without this rank: this one
        Ok(round.last.as_ref().clone())
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
        return Err(Error::Exchange(why.clone()));
    }
    if Instant::now() >= deadline {
        let missing: Vec<usize> = (0..shared.size).filter(|&r| round.slots[r].is_none()).collect();
        let why = format!(
            "rank {rank} waited {:?} for ranks {missing:?} of {}: a rank failed or stopped calling",
            shared.timeout, shared.size
        );
        round.failed = Some(why.clone());
        shared.done.notify_all();
        return Err(Error::Exchange(why));
    }
    Ok(round)
}

/// What every rank says about the call it makes: ranks that disagree get
/// an error, every one of them, instead of a wrong merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallHeader {
    /// Which collective of a layer (forward moments, backward sums).
    pub kind: u32,
    /// The layer's count of synchronized calls so far.
    pub sequence: u64,
    pub channels: u32,
    /// A fingerprint of the layer's config and dtype.
    pub fingerprint: u64,
}

const MAGIC: u32 = 0x314e_4257; // "WBN1"
const HEADER_BYTES: usize = 4 + 4 + 8 + 4 + 8;

impl CallHeader {
    /// The call in words, for error messages.
    fn describe(&self) -> String {
        let kind = match self.kind {
            KIND_FORWARD => "a training forward",
            KIND_FORWARD_MASKED => "a masked training forward",
            KIND_BACKWARD => "a backward",
            KIND_FAILED => "a failed call",
            _ => "an unknown call",
        };
        format!(
            "{kind}, synchronized call {} of a layer of {} channels, config and dtype fingerprint {:016x}",
            self.sequence, self.channels, self.fingerprint
        )
    }

    fn encode(&self, payload: &[f64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 8 * payload.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&self.channels.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        for v in payload {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<(CallHeader, Vec<f64>)> {
        if bytes.len() < HEADER_BYTES || !(bytes.len() - HEADER_BYTES).is_multiple_of(8) {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        if u32_at(0) != MAGIC {
            return None;
        }
        let header = CallHeader {
            kind: u32_at(4),
            sequence: u64_at(8),
            channels: u32_at(16),
            fingerprint: u64_at(20),
        };
        let payload = bytes[HEADER_BYTES..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Some((header, payload))
    }
}

/// All-gathers `payload` under `header` and returns every rank's payload
/// in rank order, after checking that every rank made the same call with
/// payloads of the same length. Every rank sees every header, so a
/// mismatch is an error on every rank.
pub(crate) fn gather_checked(exchange: &dyn Exchange, header: CallHeader, payload: &[f64]) -> Result<Vec<Vec<f64>>> {
    if exchange.size() == 0 || exchange.rank() >= exchange.size() {
        return Err(Error::Exchange(format!(
            "the exchange says this is rank {} of {}: a rank must be below a size of one or more",
            exchange.rank(),
            exchange.size()
        )));
    }
    let all = exchange.all_gather(&header.encode(payload))?;
    if all.len() != exchange.size() {
        return Err(Error::Exchange(format!(
            "the exchange returned {} ranks' bytes, it has {} ranks",
            all.len(),
            exchange.size()
        )));
    }
    let mut out = Vec::with_capacity(all.len());
    for (rank, bytes) in all.iter().enumerate() {
        let Some((theirs, values)) = CallHeader::decode(bytes) else {
            return Err(Error::Exchange(format!(
                "rank {rank} sent no synchronized-layer message"
            )));
        };
        if theirs.kind == KIND_FAILED && header.kind != KIND_FAILED {
            return Err(Error::Exchange(format!(
                "rank {rank}'s call failed before the exchange (its own error says why)"
            )));
        }
        if theirs != header || values.len() != payload.len() {
            return Err(Error::Exchange(format!(
                "rank {rank} made another call ({}, {} values) than rank {} ({}, {} values): \
                 every rank must call the same layers in the same order, with the same channels, dtype and config",
                theirs.describe(),
                values.len(),
                exchange.rank(),
                header.describe(),
                payload.len()
            )));
        }
        out.push(values);
    }
    Ok(out)
}

/// Every rank's `local` values gathered under `header` and added element
/// by element in rank order: every rank gets the same bits.
pub(crate) fn gather_sums(exchange: &dyn Exchange, header: CallHeader, local: &[f64]) -> Result<Vec<f64>> {
    let ranks = gather_checked(exchange, header, local)?;
    Ok((0..local.len())
        .map(|i| ranks.iter().fold(0.0, |sum, r| sum + r[i]))
        .collect())
}

/// The collective of a training forward, with a mask or without.
pub(crate) fn forward_kind(masked: bool) -> u32 {
    if masked { KIND_FORWARD_MASKED } else { KIND_FORWARD }
}

/// A fingerprint of what every rank's layer must agree on (its config,
/// its dtype): FNV-1a of their debug form.
pub(crate) fn fingerprint(what: &str) -> u64 {
    what.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The collectives of a synchronized layer (`CallHeader::kind`).
pub(crate) const KIND_FORWARD: u32 = 1;
pub(crate) const KIND_FORWARD_MASKED: u32 = 2;
pub(crate) const KIND_BACKWARD: u32 = 3;
/// Sent by a rank whose call failed before its collective, so that the
/// others fail at once instead of at the timeout.
pub(crate) const KIND_FAILED: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_group_gathers_in_rank_order_round_after_round() {
        let group = LocalExchange::group(3, Duration::from_secs(20));
        let handles: Vec<_> = group
            .into_iter()
            .map(|ex| {
                std::thread::spawn(move || {
                    for round in 0..200u32 {
                        // unequal lengths, and one rank often empty
                        let mine = vec![ex.rank() as u8; (ex.rank() * round as usize) % 5];
                        let all = ex.all_gather(&mine).unwrap();
                        for (r, bytes) in all.iter().enumerate() {
                            assert_eq!(bytes, &vec![r as u8; (r * round as usize) % 5], "round {round}");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_rank_that_stops_calling_fails_the_others_in_time() {
        let mut group = LocalExchange::group(3, Duration::from_millis(300));
        let silent = group.pop().unwrap();
        let start = Instant::now();
        let handles: Vec<_> = group
            .into_iter()
            .map(|ex| std::thread::spawn(move || ex.all_gather(b"x")))
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::Exchange(_)), "{err}");
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // the group stays failed
        assert!(silent.all_gather(b"late").is_err());
    }

    #[test]
    fn ranks_that_make_different_calls_all_get_an_error() {
        let group = LocalExchange::group(2, Duration::from_secs(20));
        let handles: Vec<_> = group
            .into_iter()
            .map(|ex| {
                std::thread::spawn(move || {
                    let header = CallHeader {
                        kind: 1,
                        sequence: 0,
                        // rank 1 has another channel count
                        channels: 4 + ex.rank() as u32,
                        fingerprint: 7,
                    };
                    gather_checked(&ex, header, &[1.0; 12])
                })
            })
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("another call"), "{err}");
        }
    }
}
