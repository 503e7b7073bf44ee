//! A synchronized call's collectives: the ranks agree on the call (one
//! small all-reduce), then reduce their per-channel values by a [`Scheme`]
//! whose merge order is fixed by this crate, never by the transport.

use std::fmt;
use std::str::FromStr;

use super::{CallHeader, Exchange, KIND_FAILED};
use crate::error::{Error, ExchangeFailure, Result};

/// How the ranks of a synchronized call reduce their per-channel values
/// (see [the module](super)). [`Exchange::scheme`] says which one a rank
/// asks for; every rank of a call must ask for the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Scheme {
    /// Per call, the scheme below that moves the fewest bytes through the
    /// busiest rank ([`call_cost`]), the one of fewer collectives on a tie:
    /// typically the all-gather with two ranks (or very few channels), the
    /// reduce-scatter up to about twice as many ranks as channels, the
    /// tree past that; `call_cost` decides each call exactly.
    #[default]
    Auto,
    /// Every rank all-gathers every rank's values and merges them in rank
    /// order: `2 (P - 1) n` bytes a rank (the only scheme before issue 20).
    AllGather,
    /// Rank `r` gets channels `[r C / P, (r + 1) C / P)` of every rank
    /// (an all-to-all), merges them in rank order, and the ranks
    /// all-gather the merged ranges (the bandwidth-optimal all-reduce):
    /// below `4 n` bytes a rank. The same bits as [`Scheme::AllGather`].
    ReduceScatter,
    /// An in-order binary tree over the ranks: each rank merges its left
    /// subtree's values, its own and its right subtree's (contiguous
    /// ranges of ranks, left to right) and sends them up; the root's go
    /// back down. At most `6 n` bytes a rank however many ranks, in `2
    /// log2(P)` rounds.
    Tree,
}

impl Scheme {
    /// Every scheme, [`Scheme::Auto`] first.
    pub const ALL: [Scheme; 4] = [Scheme::Auto, Scheme::AllGather, Scheme::ReduceScatter, Scheme::Tree];

    /// Its name on command lines: `auto`, `all-gather`, `reduce-scatter`, `tree`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Auto => "auto",
            Scheme::AllGather => "all-gather",
            Scheme::ReduceScatter => "reduce-scatter",
            Scheme::Tree => "tree",
        }
    }

    fn id(self) -> u32 {
        match self {
            Scheme::Auto => 0,
            Scheme::AllGather => 1,
            Scheme::ReduceScatter => 2,
            Scheme::Tree => 3,
        }
    }

    fn from_id(id: u32) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|s| s.id() == id)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Scheme::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("no scheme `{s}`: auto, all-gather, reduce-scatter or tree"))
    }
}

/// What one synchronized call (a training forward or a backward: three
/// float64 values a channel a rank) costs, as the exchanges count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallCost {
    /// The scheme the call runs ([`Scheme::Auto`] resolved).
    pub scheme: Scheme,
    /// Bytes sent plus received by the rank that moves the most, the
    /// agreement included.
    pub bytes: u64,
    /// Collectives every rank calls, the agreement included.
    pub collectives: usize,
}

/// The cost of one synchronized call of a layer of `channels` among
/// `ranks` under `scheme`: the formulas [`Scheme::Auto`] chooses by, the
/// same counts `LocalExchange` and `MpiExchange` report. One rank calls
/// no collective.
pub fn call_cost(scheme: Scheme, ranks: usize, channels: usize) -> CallCost {
    let plan = Plan::new(scheme, ranks, channels, 3 * 8);
    let agreement = if ranks > 1 { 2 * 8 * AGREEMENT_VALUES as u64 } else { 0 };
    CallCost {
        scheme: plan.scheme,
        bytes: plan.bytes(plan.scheme) + agreement,
        collectives: plan.collectives(plan.scheme) + usize::from(ranks > 1),
    }
}

/// The integers of the agreement: six fields, their complements (so that
/// one maximum gives each field's minimum too), a failed rank's marker.
const FIELDS: usize = 6;
const AGREEMENT_VALUES: usize = 2 * FIELDS + 1;

/// The reduction of `units` values of `unit_bytes` each among `ranks`.
struct Plan {
    ranks: usize,
    units: usize,
    unit_bytes: usize,
    /// The scheme asked for, resolved.
    scheme: Scheme,
}

impl Plan {
    fn new(asked: Scheme, ranks: usize, units: usize, unit_bytes: usize) -> Plan {
        let mut plan = Plan {
            ranks,
            units,
            unit_bytes,
            scheme: asked,
        };
        if asked == Scheme::Auto {
            plan.scheme = [Scheme::AllGather, Scheme::ReduceScatter, Scheme::Tree]
                .into_iter()
                .min_by_key(|&s| (plan.bytes(s), plan.collectives(s)))
                .expect("three schemes");
        }
        plan
    }

    /// Units of rank `r`'s range under the reduce-scatter.
    fn range(&self, r: usize) -> std::ops::Range<usize> {
        (r * self.units / self.ranks)..((r + 1) * self.units / self.ranks)
    }

    /// Sent plus received by the busiest rank under `scheme` (not Auto).
    fn bytes(&self, scheme: Scheme) -> u64 {
        let (p, n, w) = (self.ranks as u64, self.units as u64, self.unit_bytes as u64);
        if p <= 1 || n == 0 {
            return 0;
        }
        match scheme {
            Scheme::AllGather | Scheme::Auto => 2 * (p - 1) * n * w,
            // the all-to-all sends the others' ranges and receives its own
            // from each; the all-gather sends its own to each and receives
            // the others'
            Scheme::ReduceScatter => 2 * w * (n + (p - 2) * n.div_ceil(p)),
            Scheme::Tree => 2 * n * w * tree_links(self.ranks) as u64,
        }
    }

    fn collectives(&self, scheme: Scheme) -> usize {
        if self.ranks <= 1 || self.units == 0 {
            return 0;
        }
        match scheme {
            Scheme::AllGather | Scheme::Auto => 1,
            Scheme::ReduceScatter => 2,
            Scheme::Tree => 2 * tree_height(self.ranks),
        }
    }
}

/// This rank and the exchange's size, or why they cannot be.
fn check_rank(exchange: &dyn Exchange) -> Result<(usize, usize)> {
    let (rank, size) = (exchange.rank(), exchange.size());
    if size == 0 || rank >= size {
        return Err(Error::exchange(
            ExchangeFailure::Transport,
            format!("the exchange says this is rank {rank} of {size}: a rank must be below a size of one or more"),
        ));
    }
    Ok((rank, size))
}

/// How a call goes on once the ranks have agreed.
enum Agreed {
    /// Every rank makes it: reduce by this scheme (resolved).
    Reduce(Plan),
    /// Every rank's call failed before it: nothing to reduce.
    AllFailed,
}

/// The ranks agree that every one makes this call with `values` values
/// and asks for the same scheme, in one all-reduce of 13 integers
/// (maximum); where they do not, every rank all-gathers the calls' headers
/// and returns the [`Error::Exchange`] that names the first rank that
/// differs (or that failed). Every rank takes the same path: they all see
/// the same maximum.
fn agree(exchange: &dyn Exchange, header: CallHeader, values: usize, width: usize) -> Result<Agreed> {
    let (rank, size) = check_rank(exchange)?;
    let asked = exchange.scheme();
    let plan = || Plan::new(asked, size, values / width, 8 * width);
    if size == 1 {
        return Ok(if header.kind == KIND_FAILED {
            Agreed::AllFailed
        } else {
            Agreed::Reduce(plan())
        });
    }
    let fields: [u64; FIELDS] = [
        u64::from(header.kind),
        header.sequence,
        u64::from(header.channels),
        header.fingerprint,
        values as u64,
        u64::from(asked.id()),
    ];
    let mut mine = Vec::with_capacity(AGREEMENT_VALUES);
    mine.extend(fields);
    mine.extend(fields.map(|f| !f));
    mine.push(if header.kind == KIND_FAILED {
        (size - rank) as u64
    } else {
        0
    });
    let max = exchange.all_reduce_max(&mine)?;
    if max.len() != AGREEMENT_VALUES {
        return Err(Error::exchange(
            ExchangeFailure::Transport,
            format!(
                "the exchange's all-reduce returned {} values of {AGREEMENT_VALUES}",
                max.len()
            ),
        ));
    }
    let same = (0..FIELDS).all(|i| max[i] == !max[FIELDS + i]);
    match (same, max[2 * FIELDS]) {
        (true, 0) => Ok(Agreed::Reduce(plan())),
        (true, _) => Ok(Agreed::AllFailed),
        (false, _) => Err(explain(exchange, header, values, asked)),
    }
}

/// Why the ranks disagree, from every rank's header (all-gathered).
fn explain(exchange: &dyn Exchange, header: CallHeader, values: usize, asked: Scheme) -> Error {
    let all = match exchange.all_gather(&header.encode(values as u64, asked.id())) {
        Ok(all) => all,
        Err(e) => return e,
    };
    for (rank, bytes) in all.iter().enumerate() {
        let Some((theirs, their_values, their_scheme)) = CallHeader::decode(bytes) else {
            return Error::exchange(
                ExchangeFailure::RankFailed,
                format!("rank {rank} sent no synchronized-layer message"),
            );
        };
        if theirs.kind == KIND_FAILED && header.kind != KIND_FAILED {
            return Error::exchange(
                ExchangeFailure::RankFailed,
                format!("rank {rank}'s call failed before the exchange (its own error says why)"),
            );
        }
        if theirs != header || their_values != values as u64 {
            return Error::exchange(
                ExchangeFailure::Mismatch,
                format!(
                    "rank {rank} made another call ({}, {their_values} values) than rank {} ({}, {values} values): \
                 every rank must call the same layers in the same order, with the same channels, dtype and config",
                    theirs.describe(),
                    exchange.rank(),
                    header.describe(),
                ),
            );
        }
        if their_scheme != asked.id() {
            let name = Scheme::from_id(their_scheme).map_or("an unknown", Scheme::name);
            return Error::exchange(
                ExchangeFailure::Mismatch,
                format!(
                    "rank {rank}'s exchange asks for the {name} scheme, rank {}'s for the {asked} scheme: \
                 every rank's exchange must ask for the same",
                    exchange.rank()
                ),
            );
        }
    }
    Error::exchange(
        ExchangeFailure::Mismatch,
        "the ranks' calls differ (their all-reduce said so, their headers do not)",
    )
}

/// All-gathers `payload` under `header` and returns every rank's payload
/// in rank order, once every rank has agreed to make the same call with
/// payloads of the same length (a mismatch, or a rank whose call failed,
/// is an error on every rank). A rank whose call failed before its
/// exchange calls this with [`KIND_FAILED`] and no payload, so that the
/// others fail at once; where every rank's failed, each gets no payloads.
pub(crate) fn gather_checked(exchange: &dyn Exchange, header: CallHeader, payload: &[f64]) -> Result<Vec<Vec<f64>>> {
    match agree(exchange, header, payload.len(), 1)? {
        Agreed::AllFailed => Ok(vec![Vec::new(); exchange.size()]),
        Agreed::Reduce(_) if exchange.size() == 1 => Ok(vec![payload.to_vec()]),
        Agreed::Reduce(_) => {
            let bytes = to_bytes(payload);
            let all = exchange.all_gather_sized(&bytes, &vec![bytes.len(); exchange.size()])?;
            Ok(all.iter().map(|b| from_bytes(b)).collect())
        }
    }
}

/// Every rank's `local` sums (three a channel) added element by element in
/// the scheme's fixed order (rank order but under the tree), under
/// `header`: every rank gets the same bits.
pub(crate) fn gather_sums(exchange: &dyn Exchange, header: CallHeader, local: &[f64]) -> Result<Vec<f64>> {
    reduce_checked(exchange, header, local, 3, |acc, x| {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    })
}

/// Every rank's `local` values, `width` a channel, merged channel by
/// channel with `combine` (`combine(acc, x)`: `acc` becomes `acc` merged
/// with `x`, the values of later ranks; zeros are its identity) under
/// `header`, once the ranks agree on the call. Each channel's merge starts
/// from zeros and takes the ranks in rank order (all-gather,
/// reduce-scatter) or contiguous ranges of them left to right (tree):
/// every rank gets the same bits.
pub(crate) fn reduce_checked(
    exchange: &dyn Exchange,
    header: CallHeader,
    local: &[f64],
    width: usize,
    combine: fn(&mut [f64], &[f64]),
) -> Result<Vec<f64>> {
    let Agreed::Reduce(plan) = agree(exchange, header, local.len(), width)? else {
        return Err(Error::exchange(
            ExchangeFailure::RankFailed,
            "every rank's call failed before the exchange",
        ));
    };
    // every rank agreed on the length: every rank refuses alike
    if !local.len().is_multiple_of(width) {
        return Err(Error::exchange(
            ExchangeFailure::Mismatch,
            format!("{} values are not {width} a channel", local.len()),
        ));
    }
    let reduce = Reduce { width, combine };
    if plan.ranks == 1 || plan.units == 0 {
        return Ok(reduce.fold(&[local], plan.units));
    }
    match plan.scheme {
        Scheme::AllGather | Scheme::Auto => {
            let bytes = to_bytes(local);
            let all = exchange.all_gather_sized(&bytes, &vec![bytes.len(); plan.ranks])?;
            let ranks: Vec<Vec<f64>> = all.iter().map(|b| from_bytes(b)).collect();
            let ranks: Vec<&[f64]> = ranks.iter().map(Vec::as_slice).collect();
            Ok(reduce.fold(&ranks, plan.units))
        }
        Scheme::ReduceScatter => reduce.scattered(exchange, &plan, local),
        Scheme::Tree => reduce.tree(exchange, &plan, local),
    }
}

/// A merge of values, `width` a unit (a channel).
struct Reduce {
    width: usize,
    combine: fn(&mut [f64], &[f64]),
}

impl Reduce {
    /// Each unit of every rank's values merged in rank order from zeros.
    fn fold(&self, ranks: &[&[f64]], units: usize) -> Vec<f64> {
        let mut out = vec![0.0; units * self.width];
        for rank in ranks {
            for (acc, x) in out.chunks_exact_mut(self.width).zip(rank.chunks_exact(self.width)) {
                (self.combine)(acc, x);
            }
        }
        out
    }

    /// The reduce-scatter: this rank's range of every rank (an
    /// all-to-all), merged in rank order, then every merged range (an
    /// all-gather).
    fn scattered(&self, exchange: &dyn Exchange, plan: &Plan, local: &[f64]) -> Result<Vec<f64>> {
        let me = exchange.rank();
        let w = plan.unit_bytes;
        let bytes = to_bytes(local);
        let blocks: Vec<&[u8]> = (0..plan.ranks)
            .map(|j| {
                let r = plan.range(j);
                &bytes[r.start * w..r.end * w]
            })
            .collect();
        let mine = plan.range(me);
        let got = exchange.all_to_all(&blocks, &vec![mine.len() * w; plan.ranks])?;
        let ranks: Vec<Vec<f64>> = got.iter().map(|b| from_bytes(b)).collect();
        let ranks: Vec<&[f64]> = ranks.iter().map(Vec::as_slice).collect();
        let merged = to_bytes(&self.fold(&ranks, mine.len()));
        let lengths: Vec<usize> = (0..plan.ranks).map(|j| plan.range(j).len() * w).collect();
        let all = exchange.all_gather_sized(&merged, &lengths)?;
        Ok(all.iter().flat_map(|b| from_bytes(b)).collect())
    }

    /// The tree: merged up to the root in rounds by height, the root's
    /// result sent down in rounds by depth, each round an all-to-all in
    /// which a rank sends to and receives from its tree neighbours only.
    fn tree(&self, exchange: &dyn Exchange, plan: &Plan, local: &[f64]) -> Result<Vec<f64>> {
        let me = exchange.rank();
        let node = TreeNode::of(plan.ranks, me);
        let height = tree_height(plan.ranks);
        let block = plan.units * plan.unit_bytes;
        let empty: &[u8] = &[];
        let mut from_children: [Option<Vec<f64>>; 2] = [None, None];
        let mut merged: Option<Vec<u8>> = None;
        let merge_subtree = |from_children: &[Option<Vec<f64>>; 2]| -> Vec<u8> {
            // left subtree, this rank, right subtree: ranks in order
            let parts: Vec<&[f64]> = [from_children[0].as_deref(), Some(local), from_children[1].as_deref()]
                .into_iter()
                .flatten()
                .collect();
            to_bytes(&self.fold(&parts, plan.units))
        };
        for round in 0..height {
            if round == node.height {
                merged = Some(merge_subtree(&from_children));
            }
            let mut blocks = vec![empty; plan.ranks];
            let mut lengths = vec![0; plan.ranks];
            if let (true, Some(parent), Some(m)) = (round == node.height, node.parent, merged.as_deref()) {
                blocks[parent] = m;
            }
            for &(c, h) in node.children.iter().flatten() {
                if h == round {
                    lengths[c] = block;
                }
            }
            let got = exchange.all_to_all(&blocks, &lengths)?;
            for (i, child) in node.children.iter().enumerate() {
                if let Some((c, h)) = *child
                    && h == round
                {
                    from_children[i] = Some(from_bytes(&got[c]));
                }
            }
        }
        let mut result = match node.parent {
            None => Some(merged.unwrap_or_else(|| merge_subtree(&from_children))),
            Some(_) => None,
        };
        for round in 0..height {
            let mut blocks = vec![empty; plan.ranks];
            let mut lengths = vec![0; plan.ranks];
            if round == node.depth
                && let Some(r) = result.as_deref()
            {
                for (c, _) in node.children.iter().flatten() {
                    blocks[*c] = r;
                }
            }
            let from_parent = node.parent.filter(|_| round + 1 == node.depth);
            if let Some(p) = from_parent {
                lengths[p] = block;
            }
            let got = exchange.all_to_all(&blocks, &lengths)?;
            if let Some(p) = from_parent {
                result = Some(got[p].clone());
            }
        }
        let result = result
            .ok_or_else(|| Error::exchange(ExchangeFailure::Transport, "the tree's broadcast missed this rank"))?;
        Ok(from_bytes(&result))
    }
}

/// A rank's place in the in-order tree over ranks `0..size`: the root of
/// a range of ranks is its middle one, `lo + (hi - lo) / 2`; its subtrees
/// are the ranges either side.
#[derive(Debug, PartialEq, Eq)]
struct TreeNode {
    parent: Option<usize>,
    /// The left child and the right one, each with its height.
    children: [Option<(usize, usize)>; 2],
    /// Rounds from the leaves below it: it sends up in reduce round `height`.
    height: usize,
    /// Steps from the root: it receives in broadcast round `depth - 1`.
    depth: usize,
}

impl TreeNode {
    fn of(size: usize, rank: usize) -> TreeNode {
        let (mut lo, mut hi, mut parent, mut depth) = (0, size, None, 0);
        loop {
            let root = lo + (hi - lo) / 2;
            if rank == root {
                let child = |a: usize, b: usize| (a < b).then(|| (a + (b - a) / 2, tree_height(b - a)));
                return TreeNode {
                    parent,
                    children: [child(lo, root), child(root + 1, hi)],
                    height: tree_height(hi - lo),
                    depth,
                };
            }
            parent = Some(root);
            depth += 1;
            if rank < root {
                hi = root;
            } else {
                lo = root + 1;
            }
        }
    }
}

/// The height of the in-order tree over `size` ranks (0 for one): its
/// left subtree holds `size / 2` ranks, at least as many as its right one.
fn tree_height(size: usize) -> usize {
    if size <= 1 { 0 } else { 1 + tree_height(size / 2) }
}

/// The most tree edges at one rank over `size` ranks: with six ranks or
/// more, a rank with two children and a parent.
fn tree_links(size: usize) -> usize {
    match size {
        0 | 1 => 0,
        2 => 1,
        3..=5 => 2,
        _ => 3,
    }
}

fn to_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{KIND_BACKWARD, KIND_FORWARD, LocalExchange};
    use super::*;

    fn header(kind: u32, channels: u32) -> CallHeader {
        CallHeader {
            kind,
            sequence: 3,
            channels,
            fingerprint: 7,
        }
    }

    /// Order-sensitive: merging in another order or shape gives other bits.
    fn halve_and_add(acc: &mut [f64], x: &[f64]) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a = *a * 0.5 + v;
        }
    }

    /// Rank `r`'s values: `units * width` of them, distinct per rank.
    fn values_of(rank: usize, units: usize, width: usize) -> Vec<f64> {
        (0..units * width)
            .map(|i| 1.0 + rank as f64 * 0.37 + i as f64 * 1.3e-3)
            .collect()
    }

    /// The tree's merge of ranks `lo..hi`, computed in one place.
    fn tree_fold(lo: usize, hi: usize, units: usize, width: usize) -> Vec<f64> {
        let root = lo + (hi - lo) / 2;
        let reduce = Reduce {
            width,
            combine: halve_and_add,
        };
        let own = values_of(root, units, width);
        let (left, right) = (
            (lo < root).then(|| tree_fold(lo, root, units, width)),
            (root + 1 < hi).then(|| tree_fold(root + 1, hi, units, width)),
        );
        let parts: Vec<&[f64]> = [left.as_deref(), Some(&own[..]), right.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        reduce.fold(&parts, units)
    }

    /// Every rank of a group of `size` reduces under `scheme`: what each
    /// got and what its exchange counted.
    fn run(size: usize, units: usize, width: usize, scheme: Scheme) -> Vec<(Vec<f64>, u64)> {
        let handles: Vec<_> = LocalExchange::group(size, Duration::from_secs(30))
            .into_iter()
            .map(|ex| {
                let ex = ex.with_scheme(scheme);
                std::thread::spawn(move || {
                    let local = values_of(ex.rank(), units, width);
                    let got =
                        reduce_checked(&ex, header(KIND_FORWARD, units as u32), &local, width, halve_and_add).unwrap();
                    (got, ex.traffic().unwrap().total())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_scheme_gives_every_rank_the_same_bits_and_costs_what_it_says() {
        for size in [1, 2, 3, 4, 5, 6, 7, 9, 12] {
            for units in [1, 2, 5, 13] {
                let in_order = {
                    let ranks: Vec<Vec<f64>> = (0..size).map(|r| values_of(r, units, 3)).collect();
                    let ranks: Vec<&[f64]> = ranks.iter().map(Vec::as_slice).collect();
                    Reduce {
                        width: 3,
                        combine: halve_and_add,
                    }
                    .fold(&ranks, units)
                };
                for scheme in Scheme::ALL {
                    let at = format!("{size} ranks, {units} channels, {scheme}");
                    let got = run(size, units, 3, scheme);
                    let cost = call_cost(scheme, size, units);
                    let want = match cost.scheme {
                        Scheme::Tree => tree_fold(0, size, units, 3),
                        _ => in_order.clone(),
                    };
                    for (rank, (values, _)) in got.iter().enumerate() {
                        assert_eq!(values, &want, "{at}: rank {rank}");
                    }
                    let busiest = got.iter().map(|g| g.1).max().unwrap();
                    assert_eq!(busiest, cost.bytes, "{at}");
                    if scheme == Scheme::Auto {
                        let gather = call_cost(Scheme::AllGather, size, units);
                        assert!(cost.bytes <= gather.bytes, "{at}: {cost:?} vs {gather:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn auto_picks_by_bytes_and_stays_at_o_of_channels() {
        let pick = |p, c| call_cost(Scheme::Auto, p, c).scheme;
        // two ranks (or three of one channel): the all-gather moves as
        // little, in one collective
        assert_eq!(pick(2, 2048), Scheme::AllGather);
        assert_eq!(pick(3, 1), Scheme::AllGather);
        assert_eq!(pick(8, 1), Scheme::Tree);
        // the tree past twice as many ranks as channels, plus two
        assert_eq!(pick(10, 4), Scheme::ReduceScatter);
        assert_eq!(pick(11, 4), Scheme::Tree);
        assert_eq!(pick(3, 64), Scheme::ReduceScatter);
        assert_eq!(pick(8, 2048), Scheme::ReduceScatter);
        assert_eq!(pick(1024, 64), Scheme::Tree);
        for channels in [1, 2, 3, 8, 64, 100, 2048] {
            let payload = 24 * channels as u64;
            for ranks in (2..300).chain([1024, 4096, 16384]) {
                let auto = call_cost(Scheme::Auto, ranks, channels);
                let gather = call_cost(Scheme::AllGather, ranks, channels);
                assert!(auto.bytes <= gather.bytes, "{ranks} {channels}");
                // never past 6 payloads (the tree's worst), plus the agreement
                assert!(auto.bytes <= 6 * payload + 208, "{ranks} {channels}: {auto:?}");
            }
        }
        assert_eq!(call_cost(Scheme::Auto, 1, 64).bytes, 0);
    }

    #[test]
    fn the_tree_is_an_in_order_tree_of_the_heights_and_links_it_claims() {
        for size in 1..200 {
            let nodes: Vec<TreeNode> = (0..size).map(|r| TreeNode::of(size, r)).collect();
            let mut most = 0;
            for (r, node) in nodes.iter().enumerate() {
                for (i, child) in node.children.iter().enumerate() {
                    if let Some((c, h)) = *child {
                        assert_eq!(nodes[c].parent, Some(r));
                        assert_eq!(nodes[c].height, h);
                        assert!(h < node.height);
                        assert_eq!(nodes[c].depth, node.depth + 1);
                        assert_eq!(c < r, i == 0);
                    }
                }
                assert!(node.depth <= tree_height(size));
                most = most.max(node.children.iter().flatten().count() + usize::from(node.parent.is_some()));
            }
            assert_eq!(nodes.iter().filter(|n| n.parent.is_none()).count(), 1);
            assert_eq!(most, tree_links(size), "{size}");
        }
    }

    #[test]
    fn ranks_that_make_different_calls_all_get_an_error() {
        let group = LocalExchange::group(2, Duration::from_secs(20));
        let handles: Vec<_> = group
            .into_iter()
            .map(|ex| {
                std::thread::spawn(move || {
                    // rank 1 has another channel count
                    let h = header(KIND_FORWARD, 4 + ex.rank() as u32);
                    gather_checked(&ex, h, &[1.0; 12])
                })
            })
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("another call"), "{err}");
        }
    }

    #[test]
    fn ranks_that_ask_for_different_schemes_all_get_an_error() {
        let handles: Vec<_> = LocalExchange::group(3, Duration::from_secs(20))
            .into_iter()
            .map(|ex| {
                let scheme = if ex.rank() == 2 { Scheme::Tree } else { Scheme::Auto };
                let ex = ex.with_scheme(scheme);
                std::thread::spawn(move || gather_sums(&ex, header(KIND_BACKWARD, 2), &[1.0; 6]))
            })
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err();
            assert!(err.to_string().contains("scheme"), "{err}");
        }
    }

    #[test]
    fn a_failed_rank_fails_the_others_under_every_scheme_and_the_next_call_runs() {
        for scheme in Scheme::ALL {
            let handles: Vec<_> = LocalExchange::group(4, Duration::from_secs(20))
                .into_iter()
                .map(|ex| {
                    let ex = ex.with_scheme(scheme);
                    std::thread::spawn(move || {
                        let first = if ex.rank() == 1 {
                            let failed = CallHeader {
                                kind: KIND_FAILED,
                                ..header(KIND_BACKWARD, 8)
                            };
                            gather_checked(&ex, failed, &[]).map(|_| Vec::new())
                        } else {
                            gather_sums(&ex, header(KIND_BACKWARD, 8), &[1.0; 24])
                        };
                        // every rank failing alike exchanges no payload
                        let failed = CallHeader {
                            kind: KIND_FAILED,
                            ..header(KIND_FORWARD, 8)
                        };
                        let all_failed = gather_checked(&ex, failed, &[]).unwrap();
                        let next = gather_sums(&ex, header(KIND_BACKWARD, 8), &[1.0; 24]).unwrap();
                        (ex.rank(), first, all_failed, next)
                    })
                })
                .collect();
            for h in handles {
                let (rank, first, all_failed, next) = h.join().unwrap();
                if rank != 1 {
                    let err = first.unwrap_err().to_string();
                    assert!(err.contains("rank 1's call failed"), "{scheme}: {err}");
                }
                assert!(all_failed.iter().all(Vec::is_empty));
                assert_eq!(next, vec![4.0; 24], "{scheme}");
            }
        }
    }

    #[test]
    fn the_default_collectives_reduce_alike() {
        use crate::sync::local::GatherOnly;
        for scheme in [Scheme::ReduceScatter, Scheme::Tree] {
            let handles: Vec<_> = LocalExchange::group(7, Duration::from_secs(20))
                .into_iter()
                .map(|ex| {
                    let ex = GatherOnly(ex.with_scheme(scheme));
                    std::thread::spawn(move || {
                        let local = values_of(ex.rank(), 5, 3);
                        reduce_checked(&ex, header(KIND_FORWARD, 5), &local, 3, halve_and_add).unwrap()
                    })
                })
                .collect();
            let want = run(7, 5, 3, scheme)[0].0.clone();
            for h in handles {
                assert_eq!(h.join().unwrap(), want, "{scheme}");
            }
        }
    }
}

#[cfg(test)]
mod model {
    use super::*;

    /// ResNet-50's 53 batch-norm layers: the stem, then per stage its
    /// blocks' three layers and the first block's projection.
    fn resnet50() -> Vec<usize> {
        let mut layers = vec![64];
        for (blocks, width) in [(3, 64), (4, 128), (6, 256), (3, 512)] {
            for _ in 0..blocks {
                layers.extend([width, width, 4 * width]);
            }
            layers.push(4 * width);
        }
        layers
    }

    /// The README's model figures: a training step's forward and backward
    /// of every layer, bytes sent plus received by the busiest rank, by the
    /// all-gather and by the scheme each call picks.
    #[test]
    fn resnet50_model_figures_of_the_readme() {
        let layers = resnet50();
        assert_eq!((layers.len(), layers.iter().sum::<usize>()), (53, 26_560));
        let step = |scheme, ranks| -> u64 { layers.iter().map(|&c| 2 * call_cost(scheme, ranks, c).bytes).sum() };
        for (ranks, gather, auto) in [
            (1, 0, 0),
            (2, 2_571_808, 2_571_808),
            (8, 17_870_368, 4_484_128),
            (64, 160_656_928, 5_041_888),
            (1024, 2_608_426_528, 6_191_776),
            (16_384, 41_772_740_128, 7_671_328),
        ] {
            assert_eq!(step(Scheme::AllGather, ranks), gather, "{ranks}");
            assert_eq!(step(Scheme::Auto, ranks), auto, "{ranks}");
        }
        let picks = |ranks| -> Vec<Scheme> {
            layers
                .iter()
                .map(|&c| call_cost(Scheme::Auto, ranks, c).scheme)
                .collect()
        };
        assert_eq!(picks(1024).iter().filter(|&&s| s == Scheme::Tree).count(), 31);
        assert!(picks(1024).iter().all(|&s| s != Scheme::AllGather));
        assert!(picks(16_384).iter().all(|&s| s == Scheme::Tree));
        // the tree's bound: six payloads a call, plus the agreements
        assert_eq!(7_671_328, 2 * 6 * 24 * 26_560 + 53 * 2 * 208);
    }
}
