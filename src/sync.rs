//! Synchronized statistics, the transport-independent part: the
//! [`Exchange`] whose collectives a synchronized layer reduces its
//! per-channel moments and gradient sums through, an in-process exchange
//! for several devices (threads) of one process, the checked messages, and
//! the [`Scheme`]s of a reduction (`reduce`). [`crate::BatchNorm::set_exchange`]
//! synchronizes a GPU layer; the float64 reference's synchronized calls
//! ([`crate::reference::ReferenceLayer::forward_synchronized`]) take one
//! per call. The MPI exchange is behind the `mpi` feature.
//!
//! A synchronized call is two steps. The ranks first *agree*: one
//! all-reduce (maximum) of a few integers, 104 bytes each way whatever the
//! rank count, tells every rank whether all of them make the same call
//! (kind, sequence number, channels, config fingerprint, payload length,
//! scheme) and whether one failed before it; if not, every rank
//! all-gathers the calls' headers and returns an [`Error::Exchange`] naming
//! the first rank that differs. Then they *reduce* the per-channel values
//! by the scheme that moves the fewest bytes through the busiest rank
//! ([`Scheme::Auto`]; the choice depends only on the rank count and the
//! payload's length, on which every rank agrees):
//!
//! - [`Scheme::AllGather`], the scheme before: every rank all-gathers every
//!   rank's values and merges them all, `2 (P - 1) n` bytes a rank for `n`
//!   bytes of values;
//! - [`Scheme::ReduceScatter`]: rank `r` receives the values of its range
//!   of channels `[r n / P, (r + 1) n / P)` from every rank (an
//!   all-to-all), merges them in rank order, and the ranks all-gather the
//!   merged ranges: `2 (n + (P - 2) ceil(n / P))` bytes, below `4 n`
//!   however many ranks;
//! - [`Scheme::Tree`]: a binary tree over the ranks, each subtree a
//!   contiguous range of ranks, merged towards its root and broadcast
//!   back: at most `6 n` bytes a rank, for rank counts far above the
//!   channel count, where a range would be a channel or none.
//!
//! The first two merge every channel in rank order from the first rank to
//! the last: they give the same bits as each other. The tree merges
//! contiguous ranges of ranks left to right in a fixed shape: the same bits
//! on every rank and from run to run for a given rank count. Every rank
//! ends with the same bits under any scheme; none leaves the order to the
//! transport.

#[cfg(not(target_arch = "wasm32"))]
mod local;
// on wasm32 the crate's root stops the build with one clear message
#[cfg(all(feature = "mpi", not(target_arch = "wasm32")))]
mod mpi_exchange;
mod reduce;
#[cfg(not(target_arch = "wasm32"))]
pub use local::LocalExchange;
#[cfg(all(feature = "mpi", not(target_arch = "wasm32")))]
pub use mpi_exchange::MpiExchange;
pub use reduce::{CallCost, Scheme, call_cost};
pub(crate) use reduce::{gather_checked, gather_sums, reduce_checked};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ExchangeFailure, Result};

/// The collectives all ranks of a synchronized layer call together: the
/// application can implement them over its own transport. `rank`, `size`
/// and `all_gather` are required; the others have defaults built on
/// `all_gather` (correct, but moving every rank's bytes to every rank:
/// implement them over the transport's own collectives to move O(channels)
/// bytes a rank).
///
/// Every rank must make the same sequence of calls with lengths every rank
/// agrees on (the synchronized layers agree on them before calling): a
/// rank that fails must make the others fail (an error, or a timeout),
/// never leave them waiting for ever.
pub trait Exchange: Send + Sync {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn size(&self) -> usize;
    /// Every rank's bytes, in rank order (this rank's own among them).
    /// Blocks until every rank has called it; ranks may send different
    /// lengths, which no rank knows beforehand.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// [`Exchange::all_gather`] when every rank knows every rank's length
    /// beforehand: rank `j` sends `lengths[j]` bytes (`local` is this
    /// rank's). MPI's `MPI_Allgatherv`.
    fn all_gather_sized(&self, local: &[u8], lengths: &[usize]) -> Result<Vec<Vec<u8>>> {
        check_sizes(self, lengths, local.len())?;
        let all = self.all_gather(local)?;
        check_received(&all, lengths)?;
        Ok(all)
    }

    /// Personalised all-to-all: `blocks[j]` goes to rank `j` (this rank's
    /// own comes back to it), and the result holds, in rank order, the
    /// block each rank sent this one, of `lengths[j]` bytes from rank `j`,
    /// as every rank knows beforehand. Empty blocks cost nothing on a
    /// transport that skips them. MPI's `MPI_Alltoallv`.
    fn all_to_all(&self, blocks: &[&[u8]], lengths: &[usize]) -> Result<Vec<Vec<u8>>> {
        check_blocks(self, blocks, lengths)?;
        // each rank's blocks, framed: their count, their lengths, their bytes
        let mut framed = Vec::with_capacity(8 * (blocks.len() + 1) + blocks.iter().map(|b| b.len()).sum::<usize>());
        framed.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
        for b in blocks {
            framed.extend_from_slice(&(b.len() as u64).to_le_bytes());
        }
        for b in blocks {
            framed.extend_from_slice(b);
        }
        let me = self.rank();
        let out = self
            .all_gather(&framed)?
            .iter()
            .map(|f| unframe(f, me).map(<[u8]>::to_vec))
            .collect::<Option<Vec<Vec<u8>>>>()
            .ok_or_else(|| {
                Error::exchange(
                    ExchangeFailure::Transport,
                    "a rank's all-to-all blocks came back malformed",
                )
            })?;
        check_received(&out, lengths)?;
        Ok(out)
    }

    /// The element-wise maximum of every rank's `values` (every rank passes
    /// as many). MPI's `MPI_Allreduce` with `MPI_MAX`.
    fn all_reduce_max(&self, values: &[u64]) -> Result<Vec<u64>> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(&bytes)?;
        check_received(&all, &vec![bytes.len(); self.size()])?;
        let mut max = values.to_vec();
        for theirs in &all {
            for (m, v) in max.iter_mut().zip(theirs.chunks_exact(8)) {
                *m = (*m).max(u64::from_le_bytes(v.try_into().unwrap()));
            }
        }
        Ok(max)
    }

    /// The reduction scheme this rank asks for ([`Scheme::Auto`]: the one
    /// that moves the fewest bytes, per call). Every rank must ask for the
    /// same: ranks that differ get an [`Error::Exchange`] each.
    fn scheme(&self) -> Scheme {
        Scheme::Auto
    }

    /// The bytes this rank's collectives have moved so far, counted as they
    /// ran, where the exchange counts them (`LocalExchange` and
    /// `MpiExchange` do; the default is `None`).
    fn traffic(&self) -> Option<Traffic> {
        None
    }
}

/// What an exchange's collectives moved for one rank, counted by the
/// exchange as they ran: `sent`, the bytes of this rank that other ranks
/// receive; `received`, the bytes this rank receives from other ranks
/// (its own never count). An all-gather of `b` bytes a rank sends
/// `(P - 1) b` and receives the others' bytes (plus 8 bytes a rank each way
/// for the lengths where they are not known beforehand); an all-to-all sends
/// the blocks for other ranks and receives theirs; an all-reduce of `k`
/// integers sends and receives `8 k` (the operand and the result; an MPI
/// library may relay it through about log2(P) rounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes of this rank's that other ranks received.
    pub sent: u64,
    /// Bytes this rank received from other ranks.
    pub received: u64,
    /// Collectives this rank called.
    pub collectives: u64,
}

impl Traffic {
    /// Bytes sent and received.
    pub fn total(&self) -> u64 {
        self.sent + self.received
    }

    /// What moved since `earlier` (a reading of the same exchange).
    pub fn since(&self, earlier: Traffic) -> Traffic {
        Traffic {
            sent: self.sent.saturating_sub(earlier.sent),
            received: self.received.saturating_sub(earlier.received),
            collectives: self.collectives.saturating_sub(earlier.collectives),
        }
    }
}

/// An exchange's running [`Traffic`].
#[derive(Debug, Default)]
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) struct TrafficCounter {
    sent: AtomicU64,
    received: AtomicU64,
    collectives: AtomicU64,
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
impl TrafficCounter {
    pub(crate) fn add(&self, sent: usize, received: usize) {
        self.sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.received.fetch_add(received as u64, Ordering::Relaxed);
        self.collectives.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            collectives: self.collectives.load(Ordering::Relaxed),
        }
    }

    /// Counts an all-gather of `local` among ranks that sent `lengths`.
    pub(crate) fn all_gather(&self, rank: usize, local: usize, lengths: impl IntoIterator<Item = usize>) {
        let (mut others, mut received) = (0, 0);
        for (r, n) in lengths.into_iter().enumerate() {
            if r != rank {
                others += 1;
                received += n;
            }
        }
        self.add(others * local, received);
    }

    /// Counts an all-to-all that sent `sent[j]` bytes to and received
    /// `received[j]` bytes from rank `j`.
    pub(crate) fn all_to_all(&self, rank: usize, sent: &[usize], received: &[usize]) {
        let others = |v: &[usize]| -> usize { v.iter().enumerate().filter(|&(r, _)| r != rank).map(|(_, n)| n).sum() };
        self.add(others(sent), others(received));
    }

    /// Counts an all-reduce of `values` integers among `size` ranks.
    pub(crate) fn all_reduce(&self, size: usize, values: usize) {
        let bytes = if size > 1 { 8 * values } else { 0 };
        self.add(bytes, bytes);
    }
}

/// The block for rank `me` in an all-to-all frame of the default
/// `all_to_all`.
fn unframe(frame: &[u8], me: usize) -> Option<&[u8]> {
    let u64_at = |i: usize| -> Option<usize> {
        Some(u64::from_le_bytes(frame.get(8 * i..8 * i + 8)?.try_into().ok()?) as usize)
    };
    let count = u64_at(0)?;
    if me >= count {
        return None;
    }
    let mut at = 8 * (count + 1);
    for j in 0..me {
        at = at.checked_add(u64_at(1 + j)?)?;
    }
    frame.get(at..at.checked_add(u64_at(1 + me)?)?)
}

/// An all-to-all's blocks: one a rank, and its lengths (`check_sizes`).
fn check_blocks<E: Exchange + ?Sized>(exchange: &E, blocks: &[&[u8]], lengths: &[usize]) -> Result<()> {
    transport_check(blocks.len() == exchange.size(), || {
        format!(
            "an all-to-all of {} blocks among {} ranks",
            blocks.len(),
            exchange.size()
        )
    })?;
    check_sizes(exchange, lengths, blocks[exchange.rank()].len())
}

/// A collective's lengths: one a rank, this rank's its own.
fn check_sizes<E: Exchange + ?Sized>(exchange: &E, lengths: &[usize], mine: usize) -> Result<()> {
    let (size, rank) = (exchange.size(), exchange.rank());
    transport_check(lengths.len() == size && lengths.get(rank) == Some(&mine), || {
        format!(
            "a collective among {size} ranks given {} lengths (this rank's {:?}, it has {mine} bytes)",
            lengths.len(),
            lengths.get(rank)
        )
    })
}

/// What came back has the lengths every rank expected.
fn check_received(all: &[Vec<u8>], lengths: &[usize]) -> Result<()> {
    transport_check(all.len() == lengths.len(), || {
        format!(
            "the exchange returned {} ranks' bytes, it has {} ranks",
            all.len(),
            lengths.len()
        )
    })?;
    for (rank, (got, &want)) in all.iter().zip(lengths).enumerate() {
        transport_check(got.len() == want, || {
            format!("rank {rank} sent {} bytes where {want} were agreed", got.len())
        })?;
    }
    Ok(())
}

/// A transport error unless `ok`: the exchange broke its own contract.
fn transport_check(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::exchange(ExchangeFailure::Transport, message()))
    }
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

const MAGIC: u32 = 0x324e_4257; // "WBN2"
/// A header's message: magic, kind, sequence, channels, fingerprint, then
/// the call's count of values and the scheme it asks for.
const MESSAGE_BYTES: usize = 4 + 4 + 8 + 4 + 8 + 8 + 4;

impl CallHeader {
    /// The call in words, for error messages.
    pub(crate) fn describe(&self) -> String {
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

    /// The header, the call's count of values and its scheme as one
    /// message (what the ranks all-gather when they disagree).
    pub(crate) fn encode(&self, values: u64, scheme: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(MESSAGE_BYTES);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&self.channels.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.extend_from_slice(&values.to_le_bytes());
        out.extend_from_slice(&scheme.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<(CallHeader, u64, u32)> {
        if bytes.len() != MESSAGE_BYTES {
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
        Some((header, u64_at(28), u32_at(36)))
    }
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
    use super::local::GatherOnly;
    use super::*;
    use std::time::{Duration, Instant};

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

    /// What the default collectives (built on `all_gather`) and the local
    /// ones give: the same blocks, the same maxima.
    fn collectives_agree(ex: &dyn Exchange) {
        let (me, size) = (ex.rank(), ex.size());
        // rank r sends j + r + 1 bytes of value 10 r + j to rank j
        let blocks: Vec<Vec<u8>> = (0..size).map(|j| vec![(10 * me + j) as u8; j + me + 1]).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let lengths: Vec<usize> = (0..size).map(|r| me + r + 1).collect();
        let got = ex.all_to_all(&refs, &lengths).unwrap();
        for (r, block) in got.iter().enumerate() {
            assert_eq!(block, &vec![(10 * r + me) as u8; me + r + 1]);
        }
        let mine = vec![me as u8; 2 * me];
        let sizes: Vec<usize> = (0..size).map(|r| 2 * r).collect();
        let all = ex.all_gather_sized(&mine, &sizes).unwrap();
        for (r, bytes) in all.iter().enumerate() {
            assert_eq!(bytes, &vec![r as u8; 2 * r]);
        }
        let max = ex.all_reduce_max(&[me as u64, u64::MAX - me as u64, 7]).unwrap();
        assert_eq!(max, vec![size as u64 - 1, u64::MAX, 7]);
        // a length no rank agreed to is an error, not a hang (every rank checks)
        assert!(ex.all_gather_sized(&mine, &vec![2 * me; size + 1]).is_err());
    }

    #[test]
    fn local_and_default_collectives_deliver_each_rank_its_blocks() {
        for size in [1, 2, 3, 5] {
            let handles: Vec<_> = LocalExchange::group(size, Duration::from_secs(20))
                .into_iter()
                .map(|ex| {
                    std::thread::spawn(move || {
                        collectives_agree(&ex);
                        let traffic = ex.traffic().unwrap();
                        assert_eq!(traffic.collectives, 3);
                        let gathered = GatherOnly(ex);
                        collectives_agree(&gathered);
                        assert!(gathered.traffic().is_none());
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
    }

    #[test]
    fn a_local_exchange_counts_what_each_rank_sends_and_receives() {
        let handles: Vec<_> = LocalExchange::group(3, Duration::from_secs(20))
            .into_iter()
            .map(|ex| {
                std::thread::spawn(move || {
                    let me = ex.rank();
                    // rank r gathers r + 1 bytes: sends 2 (r + 1), receives the others'
                    ex.all_gather(&vec![0; me + 1]).unwrap();
                    let t = ex.traffic().unwrap();
                    assert_eq!((t.sent, t.received), (2 * (me as u64 + 1), 6 - (me as u64 + 1)));
                    // an all-to-all of 4 bytes to each rank
                    let blocks = [[1u8; 4].as_slice(); 3];
                    ex.all_to_all(&blocks, &[4; 3]).unwrap();
                    let u = ex.traffic().unwrap().since(t);
                    assert_eq!((u.sent, u.received, u.collectives), (8, 8, 1));
                    ex.all_reduce_max(&[1, 2]).unwrap();
                    let v = ex.traffic().unwrap().since(t).since(u);
                    assert_eq!((v.sent, v.received, v.collectives), (16, 16, 1));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn split_makes_groups_of_any_size_ranked_by_world_rank() {
        let world = LocalExchange::split(&[1, 0, 1, 1, 0], Duration::from_secs(20));
        let seen: Vec<(usize, usize)> = world.iter().map(|e| (e.rank(), e.size())).collect();
        assert_eq!(seen, [(0, 3), (0, 2), (1, 3), (2, 3), (1, 2)]);
        let handles: Vec<_> = world
            .into_iter()
            .enumerate()
            .map(|(w, ex)| std::thread::spawn(move || (w, ex.all_gather(&[w as u8]).unwrap())))
            .collect();
        for h in handles {
            let (w, all) = h.join().unwrap();
            let want: Vec<Vec<u8>> = if [1, 4].contains(&w) {
                vec![vec![1], vec![4]]
            } else {
                vec![vec![0], vec![2], vec![3]]
            };
            assert_eq!(all, want, "world rank {w}");
        }
    }

    #[test]
    fn ranks_that_call_different_collectives_all_get_an_error() {
        let handles: Vec<_> = LocalExchange::group(2, Duration::from_secs(20))
            .into_iter()
            .map(|ex| {
                std::thread::spawn(move || {
                    if ex.rank() == 0 {
                        ex.all_gather(b"x").unwrap_err()
                    } else {
                        ex.all_reduce_max(&[1]).unwrap_err()
                    }
                })
            })
            .collect();
        for h in handles {
            let err = h.join().unwrap();
            assert!(err.to_string().contains("where rank"), "{err}");
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
            assert!(matches!(err, Error::Exchange { .. }), "{err}");
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // the group stays failed
        assert!(silent.all_gather(b"late").is_err());
    }
}
