//! The training state and how one round's contributions advance it. Everything here is a
//! deterministic function of its inputs, so replaying the same records from the same
//! snapshot (crash recovery, rollbacks) gives the same bits.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use bytes::Bytes;
use compression::{CodecConfig, DecodeLimits};
use serde::{Deserialize, Serialize};
use trainer::Optimizer;
use verify::{AggregateReport, AggregationConfig, WorkerId};

/// What rounds change: the parameters, the optimizer, the downlink's residual, and where each
/// worker's uplink error feedback continues from. Everything a task depends on besides its
/// data is here, so a restart from a checkpoint and the log continues bit for bit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Rounds applied.
    pub round: u64,
    /// The parameters, exactly as every worker rebuilds them.
    pub params: Vec<f32>,
    /// The (outer) optimizer.
    pub opt: Optimizer,
    /// What lossy downlink deltas have not sent yet (empty for a lossless downlink).
    pub downlink_residual: Vec<f32>,
    /// Each worker's last contribution applied (its task id): the error-feedback base of its
    /// next task, whose residual the worker keeps. A rollback that removes contributions
    /// moves it back to the last one that stays.
    pub ef_bases: BTreeMap<WorkerId, u64>,
}

impl TrainState {
    /// A state at round 0 with `params` and `opt` and nothing else.
    pub fn new(params: Vec<f32>, opt: Optimizer) -> Self {
        TrainState {
            round: 0,
            params,
            opt,
            downlink_residual: Vec::new(),
            ef_bases: BTreeMap::new(),
        }
    }

    /// Bytes this state takes in memory (roughly).
    pub fn mem_bytes(&self) -> u64 {
        4 * (3 * self.params.len() + self.downlink_residual.len()) as u64
            + 40 * self.ef_bases.len() as u64
    }

    /// The error-feedback base of `worker`'s next task (0: none).
    pub fn ef_base(&self, worker: &WorkerId) -> u64 {
        self.ef_bases.get(worker).copied().unwrap_or(0)
    }
}

/// One accepted result, as applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Contribution {
    /// Who computed it.
    pub worker: WorkerId,
    /// Its task.
    pub task_id: u64,
    /// Samples it covers (its weight).
    pub n_samples: u32,
    /// Sum of its per-sample losses.
    pub loss_sum: f64,
    /// The encoded update exactly as received (reference-counted: a record is kept in the
    /// history and queued for the log without copies; serialized as a byte string, like
    /// `serde_bytes::ByteBuf`).
    pub update: Bytes,
    /// Whether a spot check confirmed it.
    pub verified: bool,
}

/// The contributions of one round, in part order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round (0-based) these contributions are applied in.
    pub round: u64,
    /// In part order.
    pub contributions: Vec<Contribution>,
}

impl RoundRecord {
    /// Bytes of encoded updates held.
    pub fn update_bytes(&self) -> u64 {
        self.contributions
            .iter()
            .map(|c| c.update.len() as u64)
            .sum()
    }
}

/// How a record is applied.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Aggregation of the contributions.
    pub aggregation: AggregationConfig,
    /// Downlink codec: lossless, or quantized deltas with error feedback.
    pub downlink: CodecConfig,
    /// Limits for decoding stored updates.
    pub limits: DecodeLimits,
}

/// What applying a round did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Sum of the contributions' losses.
    pub loss_sum: f64,
    /// Samples covered.
    pub n: u64,
    /// The encoded lossy downlink delta of this round (None when lossless or nothing applied).
    pub delta: Option<Vec<u8>>,
    /// Aggregation details.
    pub report: AggregateReport,
}

/// Applies one round: records each contribution as its worker's next error-feedback base,
/// decodes the contributions, aggregates them (weighted by samples, in part order), takes an
/// optimizer step, and, for a lossy downlink, replaces the step by its quantized version
/// (error feedback keeps the rest for later rounds). A round left without contributions (all
/// removed by a rollback) changes nothing but the round counter.
///
/// Errors: a record of another round, a stored update that does not decode, or one that
/// does not aggregate leave the state as it was; a step that fails (a non-finite aggregate,
/// a lossy downlink's delta that does not encode) leaves it part way.
pub fn apply(state: &mut TrainState, rec: &RoundRecord, rules: &Rules) -> Result<Applied> {
    apply_decoded(state, rec, Vec::new(), rules)
}

/// [`apply`], with the updates of some contributions already decoded: `decoded[i]`, where
/// given, must be what `compression::decode_exact` gives for contribution `i`'s bytes.
pub fn apply_decoded(
    state: &mut TrainState,
    rec: &RoundRecord,
    decoded: Vec<Option<Vec<f32>>>,
    rules: &Rules,
) -> Result<Applied> {
    anyhow::ensure!(
        rec.round == state.round,
        "record of round {} applied to state at round {}",
        rec.round,
        state.round
    );
    let n = state.params.len();
    let mut given = decoded.into_iter();
    let decoded = rec
        .contributions
        .iter()
        .map(|c| match given.next().flatten() {
            Some(v) if v.len() == n => Ok(v),
            _ => compression::decode_exact(&c.update, n, &rules.limits)
                .with_context(|| format!("stored update of task {}", c.task_id)),
        })
        .collect::<Result<Vec<_>>>()?;
    if rec.contributions.is_empty() {
        state.round += 1;
        return Ok(Applied::default());
    }
    let views: Vec<&[f32]> = decoded.iter().map(Vec::as_slice).collect();
    let weights: Vec<f64> = rec
        .contributions
        .iter()
        .map(|c| f64::from(c.n_samples))
        .collect();
    let mut grad = vec![0f32; n];
    let report = verify::aggregate(&views, &weights, &rules.aggregation, &mut grad)?;
    state.round += 1;
    for c in &rec.contributions {
        state.ef_bases.insert(c.worker, c.task_id);
    }
    let loss_sum = rec.contributions.iter().map(|c| c.loss_sum).sum();
    let n_samples = rec
        .contributions
        .iter()
        .map(|c| u64::from(c.n_samples))
        .sum();
    if rules.downlink.codec.is_lossless() {
        state.opt.step(&mut state.params, &grad)?;
        return Ok(Applied {
            loss_sum,
            n: n_samples,
            delta: None,
            report,
        });
    }
    let mut next = state.params.clone();
    state.opt.step(&mut next, &grad)?;
    let keep = rules.downlink.error_feedback;
    if keep && state.downlink_residual.len() != n {
        state.downlink_residual = vec![0.0; n];
    }
    let delta: Vec<f32> = (0..n)
        .map(|i| {
            next[i] - state.params[i]
                + if keep {
                    state.downlink_residual[i]
                } else {
                    0.0
                }
        })
        .collect();
    let bytes = compression::encode(&delta, &rules.downlink, rec.round)?;
    let sent = compression::decode_exact(&bytes, n, &rules.limits)?;
    if keep {
        for i in 0..n {
            state.downlink_residual[i] = delta[i] - sent[i];
        }
    }
    executor::params::add_decoded(&mut state.params, &sent);
    Ok(Applied {
        loss_sum,
        n: n_samples,
        delta: Some(bytes),
        report,
    })
}
