//! Placement: which node runs each shard replica (docs/ARCHITECTURE.md, "A job's life"). Pure, no I/O.
//!
//! A [`Snapshot`] holds the candidate nodes with their free capacity, interned labels and
//! a job-independent score (speed, reliability, price, cluster latency), and their order
//! by that score. [`place`] walks the nodes in score order and takes, for each slot, the
//! first node that passes every hard filter, preferring nodes (or clusters) the job does not
//! use yet; so in the common case it stops after a few nodes even at 100,000 nodes.
//! Hard filters: ready (fresh heartbeat), cluster reachable and allowed, free slot,
//! CPU/memory/GPU count, GPU memory and product, required labels (data residency),
//! node-local dataset, region and zone, and never two replicas of one shard on one node.
//! With `gang`, either every slot is placed or none is.

use std::collections::{BTreeMap, HashMap, HashSet};

/// An interned string (label `key=value`, GPU product, dataset, region, account).
pub type Sym = u32;

/// Interns strings into [`Sym`]s so that filters compare integers.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    ids: HashMap<String, Sym>,
    names: Vec<String>,
}

impl Interner {
    /// The symbol of `s`, creating it.
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.names.len() as Sym;
        self.names.push(s.to_string());
        self.ids.insert(s.to_string(), id);
        id
    }

    /// The symbol of `s` if it was interned. A request naming a value no node has gets
    /// `None` and so matches nothing.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.ids.get(s).copied()
    }

    /// Symbols interned.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether nothing was interned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The string of a symbol.
    pub fn name(&self, id: Sym) -> &str {
        self.names
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// How a job's tasks spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Spread {
    /// No preference.
    None,
    /// Prefer nodes the job does not use yet.
    #[default]
    Node,
    /// Prefer the clusters where the job has the fewest tasks.
    Cluster,
}

/// A candidate node.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// Index of its member cluster in the snapshot.
    pub cluster: u32,
    /// Heartbeat fresh.
    pub ready: bool,
    /// Task slots left.
    pub free_slots: u32,
    /// Task slots in all (what the agent runs at once, capped by the pool).
    pub total_slots: u32,
    /// CPU left, in millicores.
    pub free_cpu_millis: u64,
    /// Memory left, in MiB.
    pub free_memory_mib: u64,
    /// GPUs left.
    pub free_gpus: u32,
    /// Memory per GPU, MiB.
    pub gpu_memory_mib: u64,
    /// GPU product.
    pub gpu_product: Option<Sym>,
    /// Sorted `key=value` symbols of the node's labels and its cluster's labels.
    pub labels: std::sync::Arc<[Sym]>,
    /// Sorted node-local datasets.
    pub datasets: std::sync::Arc<[Sym]>,
    /// Region of its cluster.
    pub region: Option<Sym>,
    /// Zone of its cluster.
    pub zone: Option<Sym>,
    /// Contributor account (the platform team's label).
    pub account: Option<Sym>,
    /// Owner of several accounts (the platform team's label `edgeloom.io/owner`, interned
    /// with an `owner:` prefix so it never equals an account).
    pub owner: Option<Sym>,
    /// CPU architecture (the kubelet's `kubernetes.io/arch` label, not the agent's).
    pub arch: Option<Sym>,
    /// Job-independent desirability, higher is better (see [`score`]).
    pub score: f64,
}

/// Everything placement may use, built once per scheduling cycle.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Whether each cluster is reachable.
    pub cluster_reachable: Vec<bool>,
    /// Node indices, best score first.
    pub order: Vec<u32>,
    /// Position of each node in `order`.
    position: Vec<u32>,
    /// Every node before this position in `order` can take no task in this snapshot (no
    /// free slot, not ready, or its cluster unreachable): the best nodes fill first, so
    /// without it each slot would re-scan a growing prefix of useless nodes.
    first_free: usize,
    /// Usable nodes running nothing: while there are any, a slot goes to one of them
    /// before a busy node (load spreading); at 0 that pass is skipped.
    idle: usize,
    /// Every node before this position in `order` is not idle (the idle pass's cursor,
    /// as `first_free` is the others').
    first_idle: usize,
}

impl Snapshot {
    /// Builds a snapshot, ordering nodes by score (ties by index, so deterministic).
    pub fn new(nodes: Vec<Node>, cluster_reachable: Vec<bool>) -> Snapshot {
        Snapshot::with_order_hint(nodes, cluster_reachable, None)
    }

    /// As [`Snapshot::new`], starting the sort from `hint` (a permutation of the nodes,
    /// such as the last cycle's order): the same order results, and when few scores moved
    /// the adaptive sort is nearly linear.
    pub fn with_order_hint(
        nodes: Vec<Node>,
        cluster_reachable: Vec<bool>,
        hint: Option<Vec<u32>>,
    ) -> Snapshot {
        let mut order: Vec<u32> = hint
            .filter(|h| h.len() == nodes.len())
            .unwrap_or_else(|| (0..nodes.len() as u32).collect());
        order.sort_by(|a, b| {
            nodes[*b as usize]
                .score
                .total_cmp(&nodes[*a as usize].score)
                .then(a.cmp(b))
        });
        let mut position = vec![0; nodes.len()];
        for (pos, id) in order.iter().enumerate() {
            position[*id as usize] = pos as u32;
        }
        let mut snapshot = Snapshot {
            nodes,
            cluster_reachable,
            order,
            position,
            first_free: 0,
            idle: 0,
            first_idle: 0,
        };
        snapshot.idle = (0..snapshot.nodes.len() as u32)
            .filter(|id| snapshot.is_idle(*id))
            .count();
        snapshot
    }

    /// Advances past the prefix of nodes that are not idle; returns the start.
    fn skip_busy(&mut self) -> usize {
        while let Some(&id) = self.order.get(self.first_idle) {
            if self.is_idle(id) {
                break;
            }
            self.first_idle += 1;
        }
        self.first_idle
    }

    /// Usable and running nothing.
    fn is_idle(&self, id: u32) -> bool {
        let n = &self.nodes[id as usize];
        n.free_slots > 0
            && n.free_slots >= n.total_slots
            && n.ready
            && self
                .cluster_reachable
                .get(n.cluster as usize)
                .copied()
                .unwrap_or(false)
    }

    /// Advances past the prefix of nodes that can take no task; returns the start.
    fn skip_full(&mut self) -> usize {
        while let Some(&id) = self.order.get(self.first_free) {
            let n = &self.nodes[id as usize];
            let usable = n.free_slots > 0
                && n.ready
                && self
                    .cluster_reachable
                    .get(n.cluster as usize)
                    .copied()
                    .unwrap_or(false);
            if usable {
                break;
            }
            self.first_free += 1;
        }
        self.first_free
    }
}

/// Inputs of a node's job-independent score, each normalised to [0, 1].
#[derive(Clone, Copy, Debug)]
pub struct ScoreInputs {
    /// Measured speed relative to the fastest node of the snapshot.
    pub speed: f64,
    /// Estimated probability that a task placed there completes.
    pub reliability: f64,
    /// The contributor's price factor (1 = pool rate); cheaper is better.
    pub price_factor: f64,
    /// Closeness of the node's cluster: 1 for the lowest observed API latency.
    pub locality: f64,
}

/// The score: 0.35 speed + 0.35 reliability + 0.15 price + 0.15 locality.
pub fn score(s: ScoreInputs) -> f64 {
    let price = 1.0 / (1.0 + s.price_factor.max(0.0));
    0.35 * s.speed.clamp(0.0, 1.0)
        + 0.35 * s.reliability.clamp(0.0, 1.0)
        + 0.15 * (2.0 * price).clamp(0.0, 1.0)
        + 0.15 * s.locality.clamp(0.0, 1.0)
}

/// One shard replica to place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// Nodes this slot must not use (failed there before, or running another replica).
    pub avoid: Vec<u32>,
    /// Accounts and owners of the shard's other replicas: never the same again.
    pub avoid_accounts: Vec<Sym>,
    /// The determinism class of the shard's replicas placed before (see [`class`]).
    pub class: Option<Sym>,
}

/// What a job asks of each node.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The slots to place.
    pub slots: Vec<Slot>,
    /// CPU per task, millicores.
    pub cpu_millis: u64,
    /// Memory per task, MiB.
    pub memory_mib: u64,
    /// GPUs per task.
    pub gpus: u32,
    /// Minimum memory per GPU, MiB.
    pub gpu_memory_mib: u64,
    /// Allowed GPU products; empty = any. `None` entries (unknown products) match nothing.
    pub gpu_products: Vec<Option<Sym>>,
    /// Required `key=value` labels; `None` = a label no node has.
    pub required_labels: Vec<Option<Sym>>,
    /// A required node-local dataset; `Some(None)` = one no node has.
    pub dataset: Option<Option<Sym>>,
    /// Allowed regions; empty = any.
    pub regions: Vec<Option<Sym>>,
    /// Allowed zones; empty = any.
    pub zones: Vec<Option<Sym>>,
    /// Allowed clusters (by snapshot index); empty = all.
    pub clusters: Vec<u32>,
    /// Spreading preference.
    pub spread: Spread,
    /// All slots or none.
    pub gang: bool,
    /// Nodes already running this job's tasks (for spreading).
    pub used_nodes: Vec<u32>,
    /// Replicas per shard. With more than one, a shard's replicas are compared, so they
    /// must all run in one determinism class (see [`class`]).
    pub replicas: u32,
    /// What the job wants, in words, by the filter that checks it ("1 x NVIDIA A100",
    /// "label residency=eu"): named beside that filter when a slot does not fit.
    pub wants: BTreeMap<Filter, String>,
}

/// A node's determinism class for a request: what decides whether two honest replicas
/// compute bit-identical results. On a GPU job, the GPU product (CUDA kernels differ
/// between products and from the CPU); on a CPU job, the CPU architecture. Replicas of
/// a shard are placed within one class, so an exact-digest quorum never outvotes an
/// honest node for its hardware (docs/ARCHITECTURE.md, "Verification").
pub fn class(n: &Node, gpus: u32) -> Option<Sym> {
    if gpus > 0 { n.gpu_product } else { n.arch }
}

/// A hard filter that rejected a node; counted to explain an unplaceable slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Filter {
    /// Cluster unreachable or not selected.
    Cluster,
    /// Heartbeat stale.
    NotReady,
    /// No GPU at all (the job wants one).
    NoGpu,
    /// No free task slot.
    Slots,
    /// Not enough CPU.
    Cpu,
    /// Not enough memory.
    Memory,
    /// Not enough GPUs.
    Gpus,
    /// GPU memory too small.
    GpuMemory,
    /// GPU product not allowed.
    GpuProduct,
    /// Missing a required label.
    Labels,
    /// Does not hold the dataset.
    Dataset,
    /// Region or zone not allowed.
    Topology,
    /// Already runs (or failed) this shard.
    Avoided,
    /// Not of the determinism class of the shard's other replicas.
    Class,
    /// Of the account or owner of another replica of the shard.
    SameOwner,
}

impl Filter {
    /// Words for an event or condition message.
    pub fn describe(self) -> &'static str {
        match self {
            Filter::Cluster => "are in unreachable or unselected clusters",
            Filter::NotReady => "have a stale heartbeat",
            Filter::NoGpu => "have no GPU",
            Filter::Slots => "have no free task slot",
            Filter::Cpu => "lack CPU",
            Filter::Memory => "lack memory",
            Filter::Gpus => "lack free GPUs",
            Filter::GpuMemory => "have too little GPU memory",
            Filter::GpuProduct => "have another GPU product",
            Filter::Labels => "lack a required label",
            Filter::Dataset => "do not hold the dataset",
            Filter::Topology => "are outside the allowed regions/zones",
            Filter::Avoided => "already ran this shard",
            Filter::SameOwner => "belong to the account or owner of another replica of the shard",
            Filter::Class => {
                "are of another determinism class (CPU architecture or GPU product) than the shard's other replicas"
            }
        }
    }
}

/// Why a slot could not be placed: how many nodes each filter rejected (a node counts
/// once under every filter it fails, as kube-scheduler's FitError counts), most first.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Unfit {
    /// Nodes considered.
    pub nodes: usize,
    /// Rejections per filter, most first.
    pub rejected: Vec<(Filter, usize)>,
    /// What the job wants, by filter (see [`Request::wants`]).
    pub wants: BTreeMap<Filter, String>,
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0/{} nodes fit", self.nodes)?;
        for (i, (filter, n)) in self.rejected.iter().enumerate() {
            write!(
                f,
                "{}{n} {}",
                if i == 0 { ": " } else { ", " },
                filter.describe()
            )?;
            if let Some(want) = self.wants.get(filter) {
                write!(f, " (job wants {want})")?;
            }
        }
        Ok(())
    }
}

/// The result of placing a request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// (slot index, node index) for every placed slot.
    pub assigned: Vec<(usize, u32)>,
    /// (slot index, why) for every slot left unplaced.
    pub unplaced: Vec<(usize, Unfit)>,
}

fn contains_all(have: &[Sym], want: &[Option<Sym>]) -> bool {
    want.iter()
        .all(|w| w.is_some_and(|w| have.binary_search(&w).is_ok()))
}

fn allowed(value: Option<Sym>, allowed: &[Option<Sym>]) -> bool {
    allowed.is_empty() || value.is_some_and(|v| allowed.contains(&Some(v)))
}

/// The first hard filter `node` fails for `req`, if any (capacity included).
pub fn check(snapshot: &Snapshot, id: u32, req: &Request) -> Result<(), Filter> {
    let mut first = None;
    visit_failures(snapshot, id, req, |f| {
        first = Some(f);
        false
    });
    first.map_or(Ok(()), Err)
}

/// Every hard filter `node` fails for `req` (to explain; [`check`] stops at the first).
pub fn failures(snapshot: &Snapshot, id: u32, req: &Request) -> Vec<Filter> {
    let mut all = Vec::new();
    visit_failures(snapshot, id, req, |f| {
        all.push(f);
        true
    });
    all
}

/// Calls `failed` with each hard filter the node fails, in order, while it returns true.
fn visit_failures(
    snapshot: &Snapshot,
    id: u32,
    req: &Request,
    mut failed: impl FnMut(Filter) -> bool,
) {
    let n = &snapshot.nodes[id as usize];
    let mut fail = |f: Filter, when: bool| !when || failed(f);
    let reachable = snapshot
        .cluster_reachable
        .get(n.cluster as usize)
        .copied()
        .unwrap_or(false);
    if !fail(
        Filter::Cluster,
        !reachable || (!req.clusters.is_empty() && !req.clusters.contains(&n.cluster)),
    ) || !fail(Filter::NotReady, !n.ready)
        || !fail(
            Filter::Topology,
            !allowed(n.region, &req.regions) || !allowed(n.zone, &req.zones),
        )
        || !fail(
            Filter::Labels,
            !contains_all(&n.labels, &req.required_labels),
        )
        || !fail(
            Filter::Dataset,
            req.dataset
                .is_some_and(|ds| ds.is_none_or(|d| n.datasets.binary_search(&d).is_err())),
        )
    {
        return;
    }
    if req.gpus > 0 {
        if n.gpu_product.is_none() && n.gpu_memory_mib == 0 && n.free_gpus == 0 {
            if !fail(Filter::NoGpu, true) {
                return;
            }
        } else if !fail(
            Filter::GpuProduct,
            !req.gpu_products.is_empty()
                && !n
                    .gpu_product
                    .is_some_and(|p| req.gpu_products.contains(&Some(p))),
        ) || !fail(Filter::GpuMemory, n.gpu_memory_mib < req.gpu_memory_mib)
            || !fail(Filter::Gpus, n.free_gpus < req.gpus)
        {
            return;
        }
    }
    let _ = fail(Filter::Slots, n.free_slots == 0)
        && fail(Filter::Cpu, n.free_cpu_millis < req.cpu_millis)
        && fail(Filter::Memory, n.free_memory_mib < req.memory_mib);
}

fn take(n: &mut Node, req: &Request) {
    n.free_slots -= 1;
    n.free_cpu_millis -= req.cpu_millis;
    n.free_memory_mib -= req.memory_mib;
    n.free_gpus -= req.gpus;
}

fn give_back(n: &mut Node, req: &Request) {
    n.free_slots += 1;
    n.free_cpu_millis += req.cpu_millis;
    n.free_memory_mib += req.memory_mib;
    n.free_gpus += req.gpus;
}

/// Places the request's slots on the snapshot, consuming capacity for what it places.
pub fn place(snapshot: &mut Snapshot, req: &Request) -> Outcome {
    let mut used_nodes: HashSet<u32> = req.used_nodes.iter().copied().collect();
    // Tasks of this job per cluster: Cluster spreading prefers the least-used clusters.
    let mut per_cluster: HashMap<u32, u32> = HashMap::new();
    for id in &req.used_nodes {
        if let Some(n) = snapshot.nodes.get(*id as usize) {
            *per_cluster.entry(n.cluster).or_default() += 1;
        }
    }
    let candidate_clusters: Vec<u32> = (0..snapshot.cluster_reachable.len() as u32)
        .filter(|c| {
            snapshot.cluster_reachable[*c as usize]
                && (req.clusters.is_empty() || req.clusters.contains(c))
        })
        .collect();
    // Nodes, accounts and the class taken by each shard within this call.
    let mut shard_nodes: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut shard_accounts: HashMap<u32, Vec<Sym>> = HashMap::new();
    let mut shard_class: HashMap<u32, Sym> = HashMap::new();
    let mut outcome = Outcome::default();
    // Nodes that fit per class: a shard's first replica prefers a class with room for all.
    let replicated = req.replicas > 1;
    let mut class_sizes: HashMap<Option<Sym>, u32> = HashMap::new();
    if replicated {
        for id in 0..snapshot.nodes.len() as u32 {
            if check(snapshot, id, req).is_ok() {
                *class_sizes
                    .entry(class(&snapshot.nodes[id as usize], req.gpus))
                    .or_default() += 1;
            }
        }
    }

    for (slot_index, slot) in req.slots.iter().enumerate() {
        let taken = shard_nodes.get(&slot.shard).cloned().unwrap_or_default();
        let mut accounts = slot.avoid_accounts.clone();
        accounts.extend(shard_accounts.get(&slot.shard).into_iter().flatten());
        let required = slot.class.or_else(|| shard_class.get(&slot.shard).copied());
        let blocked = |nodes: &[Node], id: u32| {
            let n = &nodes[id as usize];
            if slot.avoid.contains(&id) || taken.contains(&id) {
                Some(Filter::Avoided)
            } else if [n.account, n.owner]
                .iter()
                .flatten()
                .any(|p| accounts.contains(p))
            {
                // Two replicas of one owner could agree on a wrong result (Sybil).
                Some(Filter::SameOwner)
            } else if replicated
                && required.is_some_and(|c| class(&nodes[id as usize], req.gpus) != Some(c))
            {
                Some(Filter::Class)
            } else {
                None
            }
        };
        let mut chosen = None;
        let start = snapshot.skip_full();
        let least = candidate_clusters
            .iter()
            .map(|c| per_cluster.get(c).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        // Pass 0 honours every preference and takes only idle nodes (the best-scored of
        // them), so that a job's shards and re-placed shards spread over idle nodes before
        // any node runs two; pass 1 honours the preferences on any node; pass 2 drops them
        // (hard filters stay).
        let idle_start = if snapshot.idle > 0 {
            snapshot.skip_busy()
        } else {
            snapshot.order.len()
        };
        // Whether pass 1 met any node passing the hard filters: if not, pass 2 (which only
        // drops preferences) would find none either.
        let mut fits_any = false;
        // Whether pass 1 met any node passing the job's hard filters, whatever this slot
        // avoids: if not, no later slot of the job fits either (they share those filters).
        let mut hard_fit_any = false;
        for pass in 0..3 {
            if (pass == 0 && snapshot.idle == 0) || (pass == 2 && !fits_any) {
                continue;
            }
            let from = if pass == 0 { idle_start } else { start };
            for &id in &snapshot.order[from..] {
                if pass == 0 && !snapshot.is_idle(id) {
                    continue;
                }
                if check(snapshot, id, req).is_err() {
                    continue;
                }
                hard_fit_any |= pass == 1;
                if blocked(&snapshot.nodes, id).is_some() {
                    continue;
                }
                fits_any = true;
                if pass < 2 {
                    let n = &snapshot.nodes[id as usize];
                    if replicated
                        && required.is_none()
                        && class_sizes.get(&class(n, req.gpus)).copied().unwrap_or(0) < req.replicas
                    {
                        continue;
                    }
                    let spread_ok = match req.spread {
                        Spread::None => true,
                        Spread::Node => !used_nodes.contains(&id),
                        Spread::Cluster => {
                            per_cluster.get(&n.cluster).copied().unwrap_or(0) <= least
                        }
                    };
                    if !spread_ok {
                        continue;
                    }
                }
                chosen = Some(id);
                break;
            }
            if chosen.is_some() {
                break;
            }
        }
        match chosen {
            Some(id) => {
                if snapshot.is_idle(id) {
                    snapshot.idle -= 1;
                }
                let node = &mut snapshot.nodes[id as usize];
                take(node, req);
                used_nodes.insert(id);
                *per_cluster.entry(node.cluster).or_default() += 1;
                shard_nodes.entry(slot.shard).or_default().push(id);
                shard_accounts
                    .entry(slot.shard)
                    .or_default()
                    .extend([node.account, node.owner].into_iter().flatten());
                if replicated
                    && required.is_none()
                    && let Some(c) = class(&snapshot.nodes[id as usize], req.gpus)
                {
                    shard_class.insert(slot.shard, c);
                }
                outcome.assigned.push((slot_index, id));
            }
            None => {
                let unfit = explain(snapshot, req, |id| blocked(&snapshot.nodes, id));
                if !hard_fit_any {
                    // Nothing passes the job's filters: every slot left fails alike.
                    for rest in slot_index..req.slots.len() {
                        outcome.unplaced.push((rest, unfit.clone()));
                    }
                    break;
                }
                outcome.unplaced.push((slot_index, unfit));
            }
        }
    }
    if req.gang && !outcome.unplaced.is_empty() && !outcome.assigned.is_empty() {
        for (_, id) in outcome.assigned.drain(..) {
            give_back(&mut snapshot.nodes[id as usize], req);
            if snapshot.is_idle(id) {
                snapshot.idle += 1;
            }
            snapshot.first_idle = snapshot
                .first_idle
                .min(snapshot.position[id as usize] as usize);
            snapshot.first_free = snapshot
                .first_free
                .min(snapshot.position[id as usize] as usize);
        }
        // Every slot is unplaced; the ones that did fit carry the first failure's reason.
        let reason = outcome.unplaced[0].1.clone();
        outcome.unplaced = (0..req.slots.len()).map(|i| (i, reason.clone())).collect();
    }
    outcome
}

/// Counts, over all nodes, every filter each fails (nodes that pass them all count under
/// the slot's own filter: avoided, same owner, class).
fn explain(snapshot: &Snapshot, req: &Request, blocked: impl Fn(u32) -> Option<Filter>) -> Unfit {
    let mut counts: HashMap<Filter, usize> = HashMap::new();
    for id in 0..snapshot.nodes.len() as u32 {
        let mut failed = false;
        visit_failures(snapshot, id, req, |f| {
            failed = true;
            *counts.entry(f).or_default() += 1;
            true
        });
        if !failed && let Some(f) = blocked(id) {
            *counts.entry(f).or_default() += 1;
        }
    }
    let mut rejected: Vec<(Filter, usize)> = counts.into_iter().collect();
    rejected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let wants = rejected
        .iter()
        .filter_map(|(f, _)| Some((*f, req.wants.get(f)?.clone())))
        .collect();
    Unfit {
        nodes: snapshot.nodes.len(),
        rejected,
        wants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(cluster: u32, score: f64) -> Node {
        Node {
            cluster,
            ready: true,
            free_slots: 1,
            total_slots: 1,
            free_cpu_millis: 4000,
            free_memory_mib: 8192,
            score,
            ..Node::default()
        }
    }

    fn slots(n: u32) -> Vec<Slot> {
        (0..n)
            .map(|shard| Slot {
                shard,
                ..Slot::default()
            })
            .collect()
    }

    #[test]
    fn best_scored_fitting_node_wins() {
        let mut snap = Snapshot::new(vec![node(0, 0.2), node(0, 0.9), node(0, 0.5)], vec![true]);
        let out = place(
            &mut snap,
            &Request {
                slots: slots(1),
                ..Request::default()
            },
        );
        assert_eq!(out.assigned, vec![(0, 1)]);
        assert_eq!(snap.nodes[1].free_slots, 0);
    }

    #[test]
    fn spread_by_cluster_prefers_new_clusters() {
        let nodes = vec![node(0, 0.9), node(0, 0.8), node(1, 0.1)];
        let mut snap = Snapshot::new(nodes, vec![true, true]);
        snap.nodes[0].free_slots = 2;
        let req = Request {
            slots: slots(2),
            spread: Spread::Cluster,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let clusters: HashSet<u32> = out
            .assigned
            .iter()
            .map(|(_, id)| snap.nodes[*id as usize].cluster)
            .collect();
        assert_eq!(clusters.len(), 2);
    }

    #[test]
    fn spread_by_cluster_balances_beyond_one_task_per_cluster() {
        let mut nodes: Vec<Node> = (0..4)
            .map(|i| node(if i < 2 { 0 } else { 1 }, 1.0 - i as f64 / 10.0))
            .collect();
        for n in &mut nodes {
            n.free_slots = 2;
        }
        let mut snap = Snapshot::new(nodes, vec![true, true]);
        let req = Request {
            slots: slots(4),
            spread: Spread::Cluster,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let in_first = out
            .assigned
            .iter()
            .filter(|(_, id)| snap.nodes[*id as usize].cluster == 0)
            .count();
        assert_eq!(
            (out.assigned.len(), in_first),
            (4, 2),
            "two tasks in each cluster"
        );
    }

    /// Two clusters of two nodes, each node with two slots and one better-scored node per
    /// cluster: a 4-shard job spread by cluster runs one shard per node, not two on each
    /// cluster's best node; shards placed later go to the nodes still idle first.
    #[test]
    fn shards_spread_over_idle_nodes_before_any_node_runs_two() {
        let two_slots = |cluster, score| Node {
            free_slots: 2,
            total_slots: 2,
            ..node(cluster, score)
        };
        let nodes = vec![
            two_slots(0, 0.9),
            two_slots(0, 0.2),
            two_slots(1, 0.8),
            two_slots(1, 0.1),
        ];
        let mut snap = Snapshot::new(nodes.clone(), vec![true, true]);
        let req = Request {
            slots: slots(4),
            spread: Spread::Cluster,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let mut used: Vec<u32> = out.assigned.iter().map(|(_, id)| *id).collect();
        used.sort();
        assert_eq!(used, [0, 1, 2, 3], "one shard per node: {out:?}");
        // A re-placed shard (node 0 lost) while nodes 2 and 3 run one task each and node 1
        // is idle: it goes to the idle node, not to the better-scored busy one.
        let mut busy = nodes;
        busy[0].ready = false;
        busy[2].free_slots = 1;
        busy[3].free_slots = 1;
        let mut snap = Snapshot::new(busy, vec![true, true]);
        let out = place(
            &mut snap,
            &Request {
                slots: slots(1),
                ..Request::default()
            },
        );
        assert_eq!(out.assigned, [(0, 1)], "{out:?}");
        // With no idle node left, the best-scored node with a free slot takes it.
        let out = place(
            &mut snap,
            &Request {
                slots: slots(1),
                ..Request::default()
            },
        );
        assert_eq!(out.assigned, [(0, 2)], "{out:?}");
    }

    #[test]
    fn gang_places_all_or_nothing_and_returns_capacity() {
        let mut snap = Snapshot::new(vec![node(0, 0.9), node(0, 0.8)], vec![true]);
        let req = Request {
            slots: slots(3),
            gang: true,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        assert!(out.assigned.is_empty());
        assert_eq!(out.unplaced.len(), 3);
        assert!(
            snap.nodes.iter().all(|n| n.free_slots == 1),
            "capacity given back"
        );
    }

    #[test]
    fn unfit_explains_the_blocking_filters() {
        let mut a = node(0, 0.9);
        a.ready = false;
        let b = node(1, 0.8);
        let mut snap = Snapshot::new(vec![a, b, node(0, 0.1)], vec![true, false]);
        let req = Request {
            slots: slots(1),
            gpus: 1,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let text = out.unplaced[0].1.to_string();
        // Every filter a node fails counts, and GPU-less nodes are named as such.
        assert_eq!(
            text,
            "0/3 nodes fit: 3 have no GPU, 1 are in unreachable or unselected clusters, 1 have a stale heartbeat"
        );
    }

    /// When no node passes a job's own filters, every slot fails alike, with the same
    /// reason, and the fleet is not scanned again for each; a slot that only avoids
    /// nodes (a shard's earlier failures) does not stop the others.
    #[test]
    fn when_nothing_passes_the_jobs_filters_every_slot_fails_alike() {
        let mut snap = Snapshot::new(vec![node(0, 0.9), node(0, 0.5)], vec![true]);
        let req = Request {
            slots: slots(3),
            gpus: 1,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        assert!(out.assigned.is_empty());
        assert_eq!(
            out.unplaced.iter().map(|u| u.0).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(out.unplaced.iter().all(|u| u.1 == out.unplaced[0].1));

        let mut snap = Snapshot::new(vec![node(0, 0.9)], vec![true]);
        let mut req = Request {
            slots: slots(2),
            ..Request::default()
        };
        req.slots[0].avoid = vec![0];
        let out = place(&mut snap, &req);
        assert_eq!(out.assigned, vec![(1, 0)], "the second slot still fits");
        assert_eq!(out.unplaced.len(), 1);
    }

    /// The style of kube-scheduler's FitError: every node counted under every filter it
    /// fails, the most common first, with what the job wants named.
    #[test]
    fn reasons_count_every_filter_and_name_what_is_missing() {
        let mut interner = Interner::default();
        let a100 = interner.intern("NVIDIA A100");
        let l4 = interner.intern("NVIDIA L4");
        let eu = interner.intern("residency=eu");
        let mut gpu = node(0, 0.5);
        gpu.gpu_product = Some(l4);
        gpu.free_gpus = 1;
        gpu.gpu_memory_mib = 24_576;
        let nodes = vec![node(0, 0.9), node(0, 0.8), node(0, 0.7), gpu];
        let mut snap = Snapshot::new(nodes, vec![true]);
        let req = Request {
            slots: slots(1),
            gpus: 1,
            gpu_products: vec![Some(a100)],
            memory_mib: 100_000,
            required_labels: vec![Some(eu)],
            wants: BTreeMap::from([
                (Filter::NoGpu, "1 x NVIDIA A100".to_string()),
                (Filter::GpuProduct, "1 x NVIDIA A100".to_string()),
                (Filter::Labels, "label residency=eu".to_string()),
                (Filter::Memory, "100000Mi memory".to_string()),
            ]),
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        assert_eq!(
            out.unplaced[0].1.to_string(),
            "0/4 nodes fit: 4 lack memory (job wants 100000Mi memory), 4 lack a required label (job wants label residency=eu), \
             3 have no GPU (job wants 1 x NVIDIA A100), 1 have another GPU product (job wants 1 x NVIDIA A100)"
        );
    }

    #[test]
    fn replicas_never_share_an_account_or_an_owner() {
        let mut interner = Interner::default();
        let alice = interner.intern("alice");
        let bob = interner.intern("bob");
        let mut nodes = vec![node(0, 0.9), node(0, 0.8), node(0, 0.1)];
        nodes[0].account = Some(alice);
        nodes[1].account = Some(alice);
        nodes[2].account = Some(bob);
        let mut snap = Snapshot::new(nodes, vec![true]);
        let req = Request {
            slots: vec![
                Slot {
                    shard: 0,
                    replica: 0,
                    ..Slot::default()
                },
                Slot {
                    shard: 0,
                    replica: 1,
                    ..Slot::default()
                },
            ],
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let accounts: Vec<_> = out
            .assigned
            .iter()
            .map(|(_, id)| snap.nodes[*id as usize].account)
            .collect();
        assert_eq!(accounts, vec![Some(alice), Some(bob)]);
        // Two accounts of one owner: the second replica finds no node, and says why.
        let owner = interner.intern("owner:carol");
        let mut nodes = vec![node(0, 0.9), node(0, 0.8)];
        nodes[0].account = Some(alice);
        nodes[1].account = Some(bob);
        nodes[0].owner = Some(owner);
        nodes[1].owner = Some(owner);
        let mut snap = Snapshot::new(nodes, vec![true]);
        let out = place(&mut snap, &req);
        assert_eq!(out.assigned.len(), 1);
        let why = out.unplaced[0].1.to_string();
        assert!(why.contains("1 belong to the account or owner"), "{why}");
    }

    #[test]
    fn replicas_stay_in_one_determinism_class_with_room_for_all() {
        let mut interner = Interner::default();
        let (amd, arm) = (interner.intern("amd64"), interner.intern("arm64"));
        // The best node is the only arm64 one: a shard's first replica must not go there,
        // or its second could never run in its class.
        let mut nodes = vec![node(0, 0.9), node(0, 0.8), node(0, 0.7), node(0, 0.6)];
        nodes[0].arch = Some(arm);
        for n in &mut nodes[1..] {
            n.arch = Some(amd);
        }
        let mut snap = Snapshot::new(nodes, vec![true]);
        let two = |shard: u32| {
            (0..2).map(move |replica| Slot {
                shard,
                replica,
                ..Slot::default()
            })
        };
        let req = Request {
            slots: two(0).collect(),
            replicas: 2,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        let archs: Vec<_> = out
            .assigned
            .iter()
            .map(|(_, id)| snap.nodes[*id as usize].arch)
            .collect();
        assert_eq!(archs, [Some(amd), Some(amd)]);
        // A replica added later joins the class of the ones placed before, and says so
        // when it cannot.
        let arm_then_amd = || {
            Snapshot::new(
                vec![node(0, 0.9), node(0, 0.8)]
                    .into_iter()
                    .zip([arm, amd])
                    .map(|(mut n, a)| {
                        n.arch = Some(a);
                        n
                    })
                    .collect(),
                vec![true],
            )
        };
        let mut snap = arm_then_amd();
        let req = Request {
            slots: vec![Slot {
                shard: 0,
                replica: 2,
                class: Some(amd),
                avoid: vec![1],
                ..Slot::default()
            }],
            replicas: 2,
            ..Request::default()
        };
        let out = place(&mut snap, &req);
        assert!(out.assigned.is_empty());
        let why = out.unplaced[0].1.to_string();
        assert!(why.contains("1 are of another determinism class"), "{why}");
        // Without replication classes do not matter.
        let req = Request {
            slots: two(0).collect(),
            replicas: 1,
            ..Request::default()
        };
        let mut snap = arm_then_amd();
        assert_eq!(place(&mut snap, &req).assigned.len(), 2);
    }

    prop_compose! {
        fn arb_node(clusters: u32, syms: u32)(
            cluster in 0..clusters,
            ready in prop::bool::weighted(0.85),
            free_slots in 0u32..3,
            busy in 0u32..2,
            free_cpu_millis in 0u64..4000,
            free_memory_mib in 0u64..4096,
            free_gpus in 0u32..3,
            gpu_memory_mib in 0u64..3,
            gpu_product in prop::option::of(0..syms),
            labels in prop::collection::btree_set(0..syms, 0..3),
            datasets in prop::collection::btree_set(0..syms, 0..2),
            region in prop::option::of(0..syms),
            account in prop::option::of(0..syms),
            arch in prop::option::of(0u32..2),
            score in 0.0f64..1.0,
        ) -> Node {
            Node {
                cluster, ready, free_slots, total_slots: free_slots + busy, free_cpu_millis,
                free_memory_mib, free_gpus,
                gpu_memory_mib: gpu_memory_mib * 8192, gpu_product,
                labels: labels.into_iter().collect(), datasets: datasets.into_iter().collect(),
                region, zone: None, account, owner: None, arch, score,
            }
        }
    }

    prop_compose! {
        fn arb_request(syms: u32, nodes: u32)(
            shards in 1u32..5,
            replicas in 1u32..3,
            avoid in prop::collection::vec(0..nodes, 0..3),
            cpu_millis in 0u64..2000,
            memory_mib in 0u64..2048,
            gpus in 0u32..2,
            gpu_memory_mib in 0u64..2,
            gpu_products in prop::collection::vec(prop::option::of(0..syms), 0..2),
            required_labels in prop::collection::vec(prop::option::of(0..syms), 0..2),
            dataset in prop::option::of(prop::option::of(0..syms)),
            regions in prop::collection::vec(prop::option::of(0..syms), 0..2),
            spread in prop_oneof![Just(Spread::None), Just(Spread::Node), Just(Spread::Cluster)],
            gang in any::<bool>(),
            used_nodes in prop::collection::vec(0..nodes, 0..3),
        ) -> Request {
            let slots = (0..shards)
                .flat_map(|shard| (0..replicas).map(move |replica| (shard, replica)))
                .map(|(shard, replica)| Slot { shard, replica, avoid: avoid.clone(), avoid_accounts: vec![], class: None })
                .collect();
            Request {
                slots, cpu_millis, memory_mib, gpus, gpu_memory_mib: gpu_memory_mib * 8192,
                gpu_products, required_labels, dataset, regions, zones: vec![], clusters: vec![],
                spread, gang, used_nodes, replicas, wants: BTreeMap::new(),
            }
        }
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Node>, Vec<bool>, Request)> {
        (
            prop::collection::vec(arb_node(3, 4), 1..25),
            prop::collection::vec(prop::bool::weighted(0.8), 3),
        )
            .prop_flat_map(|(nodes, reach)| {
                let n = nodes.len() as u32;
                (Just(nodes), Just(reach), arb_request(4, n))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn placement_never_violates_a_hard_constraint((nodes, reach, req) in arb_case()) {
            let mut snap = Snapshot::new(nodes, reach);
            let mut replay = snap.clone();
            let out = place(&mut snap, &req);
            // Re-apply the assignments in order on the original: each must pass every
            // filter at the moment it was made (so capacity is never over-committed).
            let mut sorted = out.assigned.clone();
            sorted.sort();
            for (slot, id) in &sorted {
                prop_assert_eq!(check(&replay, *id, &req), Ok(()), "slot {} on node {}", slot, id);
                prop_assert!(!req.slots[*slot].avoid.contains(id));
                take(&mut replay.nodes[*id as usize], &req);
            }
            // Replicas of one shard never share a node, nor an account.
            let mut seen = HashSet::new();
            let mut paid = HashSet::new();
            for (slot, id) in &out.assigned {
                let shard = req.slots[*slot].shard;
                prop_assert!(seen.insert((shard, *id)), "two replicas of shard {} on node {}", shard, id);
                if let Some(a) = snap.nodes[*id as usize].account {
                    prop_assert!(paid.insert((shard, a)), "two replicas of shard {} paid to account {}", shard, a);
                }
            }
            // Every slot is accounted for exactly once.
            prop_assert_eq!(out.assigned.len() + out.unplaced.len(), req.slots.len());
            // Replicas of one shard run in one determinism class.
            if req.replicas > 1 {
                let mut classes: HashMap<u32, Option<Sym>> = HashMap::new();
                for (slot, id) in &out.assigned {
                    let c = class(&snap.nodes[*id as usize], req.gpus);
                    let first = *classes.entry(req.slots[*slot].shard).or_insert(c);
                    prop_assert!(first.is_none() || first == c, "shard {} spans classes", req.slots[*slot].shard);
                }
            }
        }

        #[test]
        fn gang_is_all_or_nothing((nodes, reach, mut req) in arb_case()) {
            req.gang = true;
            let mut snap = Snapshot::new(nodes, reach);
            let before: Vec<u32> = snap.nodes.iter().map(|n| n.free_slots).collect();
            let out = place(&mut snap, &req);
            prop_assert!(out.assigned.is_empty() || out.assigned.len() == req.slots.len());
            if out.assigned.is_empty() {
                let after: Vec<u32> = snap.nodes.iter().map(|n| n.free_slots).collect();
                prop_assert_eq!(before, after, "a failed gang consumes nothing");
            }
        }

        #[test]
        fn an_unplaced_slot_really_had_no_node((nodes, reach, mut req) in arb_case()) {
            req.gang = false;
            let mut snap = Snapshot::new(nodes, reach);
            let out = place(&mut snap, &req);
            for (slot_index, _) in &out.unplaced {
                let slot = &req.slots[*slot_index];
                let same_shard: Vec<u32> = out.assigned.iter()
                    .filter(|(s, _)| req.slots[*s].shard == slot.shard)
                    .map(|(_, id)| *id).collect();
                let shard_class = same_shard.first().and_then(|id| class(&snap.nodes[*id as usize], req.gpus));
                let shard_accounts: Vec<Sym> = same_shard.iter().filter_map(|id| snap.nodes[*id as usize].account).collect();
                for id in 0..snap.nodes.len() as u32 {
                    let same_class = req.replicas < 2
                        || shard_class.is_none_or(|c| class(&snap.nodes[id as usize], req.gpus) == Some(c));
                    let other_account = snap.nodes[id as usize].account.is_none_or(|a| !shard_accounts.contains(&a));
                    let fits = check(&snap, id, &req).is_ok() && !slot.avoid.contains(&id) && !same_shard.contains(&id) && same_class && other_account;
                    prop_assert!(!fits, "slot {} left unplaced although node {} fits", slot_index, id);
                }
            }
        }
    }
}
