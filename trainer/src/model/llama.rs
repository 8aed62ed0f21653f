//! A Llama-style decoder-only transformer (the architecture of Hugging Face's
//! `LlamaForCausalLM`): token embedding, `num_hidden_layers` pre-norm blocks of grouped-query
//! attention with rotary position embeddings and a SwiGLU MLP, RMSNorm, and an LM head
//! (tied to the embedding or not). Variable names are Hugging Face's
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so an exported `model.safetensors`
//! loads with `transformers.AutoModelForCausalLM.from_pretrained`.
//!
//! The arithmetic follows `transformers/models/llama/modeling_llama.py`: RMSNorm in fp32
//! (`x * rsqrt(mean(x^2) + eps) * weight`), rotary embeddings with `rotate_half` over
//! `inv_freq = 1 / theta^(2i/d)`, attention through libtorch's fused
//! `scaled_dot_product_attention` (causal), and `down(silu(gate(x)) * up(x))`.
//! On a GPU the matrix products run in bf16 with fp32 master weights, norms, residual stream
//! and loss (what `torch.autocast(dtype=torch.bfloat16)` does for this model).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::Architecture;

/// Most parameters a model spec may describe (2^32 values, 16 GiB of fp32): a bound on
/// what a config file can make the coordinator or a worker allocate.
pub const MAX_PARAMS: u64 = 1 << 32;

/// The fields of a Hugging Face Llama `config.json` this implementation uses. Unknown keys
/// of a `config.json` are ignored; keys that change the architecture in ways not
/// implemented here (`rope_scaling`, biases, another activation) are refused by
/// [`LlamaConfig::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (token ids are `0..vocab_size`).
    pub vocab_size: u32,
    /// Model width d.
    pub hidden_size: u32,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: u32,
    /// Number of transformer blocks.
    pub num_hidden_layers: u32,
    /// Query heads; `hidden_size / num_attention_heads` is the head width.
    pub num_attention_heads: u32,
    /// Key/value heads (grouped-query attention); must divide `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<u32>,
    /// Longest sequence the model is meant for (runs refuse a longer `seq_len`).
    pub max_position_embeddings: u32,
    /// Base of the rotary frequencies.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Epsilon of RMSNorm.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Optional explicit head width; must equal `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u32>,
    /// Must be `silu` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Must be absent or null: no rotary scaling is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes the rotary settings here (`{"rope_type": "default",
    /// "rope_theta": ...}`) instead of a top-level `rope_theta`; only the default type is
    /// implemented, and its `rope_theta` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Must be false when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Must be false when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
}

fn default_theta() -> f64 {
    10_000.0
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() > 1 << 20 {
            return Err(format!("{}: larger than 1 MiB", path.display()));
        }
        let mut cfg: LlamaConfig =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(theta) = cfg
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
        {
            cfg.rope_theta = theta;
        }
        cfg.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Key/value heads (defaults to the query heads, as in Hugging Face).
    pub fn kv_heads(&self) -> u32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_width(&self) -> u32 {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks the dimensions; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_key_value_heads {} does not divide num_attention_heads {}",
                self.kv_heads(),
                self.num_attention_heads
            ));
        }
        if !self.head_width().is_multiple_of(2) {
            return Err(format!(
                "head width {} (hidden_size / num_attention_heads) must be even for rotary embeddings",
                self.head_width()
            ));
        }
        if let Some(h) = self.head_dim {
            if h != self.head_width() {
                return Err(format!(
                    "head_dim {h} differs from hidden_size / num_attention_heads = {}",
                    self.head_width()
                ));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!("rope_theta {} must be > 1", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!(
                "rms_norm_eps {} must be in (0, 1)",
                self.rms_norm_eps
            ));
        }
        if self.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(format!(
                "hidden_act {:?}: only silu is implemented",
                self.hidden_act
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling: no rotary scaling is implemented".into());
        }
        if let Some(p) = &self.rope_parameters {
            let kind = p.get("rope_type").and_then(serde_json::Value::as_str);
            if !(p.is_null() || kind.is_none() || kind == Some("default")) {
                return Err(format!(
                    "rope_parameters.rope_type {kind:?}: only the default rotary embedding is implemented"
                ));
            }
            let theta = p.get("rope_theta").and_then(serde_json::Value::as_f64);
            if theta.is_some_and(|t| t != self.rope_theta) {
                return Err(format!(
                    "rope_parameters.rope_theta {theta:?} differs from rope_theta {}",
                    self.rope_theta
                ));
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            return Err("attention_bias / mlp_bias: biases are not implemented".into());
        }
        if self.n_params() > MAX_PARAMS {
            return Err(format!(
                "{} parameters, more than the limit of {MAX_PARAMS}",
                self.n_params()
            ));
        }
        Ok(())
    }

    /// Parameter count (u64 arithmetic, so hostile sizes cannot overflow).
    pub fn n_params(&self) -> u64 {
        let (v, d, f, l) = (
            u64::from(self.vocab_size),
            u64::from(self.hidden_size),
            u64::from(self.intermediate_size),
            u64::from(self.num_hidden_layers),
        );
        let kv = u64::from(self.kv_heads()) * u64::from(self.head_width());
        let block = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + l * block + d + head
    }

    /// The `config.json` Hugging Face's `AutoModelForCausalLM` reads for this model.
    pub fn hf_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads(),
            "head_dim": self.head_width(),
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "rope_scaling": null,
            "initializer_range": INIT_STD,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }
}

/// Standard deviation of the initial weights (Hugging Face's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

struct Block {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The transformer's variables.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to the embedding.
    lm_head: Option<Tensor>,
    /// Matrix products and attention in bf16.
    bf16: bool,
}

fn weight(p: &nn::Path, name: &str, out: u32, inp: u32) -> Tensor {
    p.sub(name).var(
        "weight",
        &[i64::from(out), i64::from(inp)],
        nn::Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )
}

fn norm_weight(p: &nn::Path, name: &str, d: u32) -> Tensor {
    p.sub(name)
        .var("weight", &[i64::from(d)], nn::Init::Const(1.0))
}

impl Llama {
    /// Creates the variables under `root` (Hugging Face's names), initialised like
    /// `LlamaPreTrainedModel._init_weights`: normal(0, 0.02) matrices, unit norm weights.
    pub fn new(root: &nn::Path, cfg: &LlamaConfig) -> Self {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let kv = cfg.kv_heads() * cfg.head_width();
        let m = root.sub("model");
        let embed = weight(&m, "embed_tokens", cfg.vocab_size, d);
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.sub("layers").sub(i.to_string());
                let a = l.sub("self_attn");
                let mlp = l.sub("mlp");
                Block {
                    input_norm: norm_weight(&l, "input_layernorm", d),
                    q: weight(&a, "q_proj", d, d),
                    k: weight(&a, "k_proj", kv, d),
                    v: weight(&a, "v_proj", kv, d),
                    o: weight(&a, "o_proj", d, d),
                    post_norm: norm_weight(&l, "post_attention_layernorm", d),
                    gate: weight(&mlp, "gate_proj", f, d),
                    up: weight(&mlp, "up_proj", f, d),
                    down: weight(&mlp, "down_proj", d, f),
                }
            })
            .collect();
        let norm = norm_weight(&m, "norm", d);
        let lm_head =
            (!cfg.tie_word_embeddings).then(|| weight(root, "lm_head", cfg.vocab_size, d));
        Llama {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            bf16: false,
        }
    }

    /// With `on`, matrix products and attention run in bf16 (fp32 master weights, norms,
    /// residual stream and logits): for GPUs.
    pub fn mixed_precision(mut self, on: bool) -> Self {
        self.bf16 = on;
        self
    }

    /// Logits `[batch, seq, vocab]` (fp32) for token ids `[batch, seq]` (int64).
    // `x = x + f(x)`, not `x += f(x)`: an in-place add would overwrite a tensor autograd
    // still needs (the residual stream feeds the next norm).
    #[allow(clippy::assign_op_pattern)]
    fn logits(&self, tokens: &Tensor) -> Tensor {
        let (b, t) = match tokens.size().as_slice() {
            [b, t] => (*b, *t),
            other => panic!("token batch must be [batch, seq], got {other:?}"),
        };
        let c = &self.cfg;
        let (h, kvh, hd) = (
            i64::from(c.num_attention_heads),
            i64::from(c.kv_heads()),
            i64::from(c.head_width()),
        );
        let dev = tokens.device();
        let lp = if self.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let lin = |x: &Tensor, w: &Tensor| x.matmul(&w.to_kind(lp).tr());
        let (cos, sin) = rotary(t, hd, c.rope_theta, dev);
        let (cos, sin) = (cos.to_kind(lp), sin.to_kind(lp));
        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false);
        for blk in &self.blocks {
            let hn = rms_norm(&x, &blk.input_norm, c.rms_norm_eps).to_kind(lp);
            let q = lin(&hn, &blk.q).view([b, t, h, hd]).transpose(1, 2);
            let k = lin(&hn, &blk.k).view([b, t, kvh, hd]).transpose(1, 2);
            let v = lin(&hn, &blk.v).view([b, t, kvh, hd]).transpose(1, 2);
            let q = apply_rotary(&q, &cos, &sin);
            let k = apply_rotary(&k, &cos, &sin);
            // Grouped-query attention: each key/value head serves h / kvh query heads
            // (Hugging Face's `repeat_kv`).
            let (k, v) = if kvh == h {
                (k, v)
            } else {
                (
                    k.repeat_interleave_self_int(h / kvh, Some(1), None),
                    v.repeat_interleave_self_int(h / kvh, Some(1), None),
                )
            };
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, false,
            );
            let a = a.transpose(1, 2).contiguous().view([b, t, h * hd]);
            x = x + lin(&a, &blk.o).to_kind(Kind::Float);
            let hn = rms_norm(&x, &blk.post_norm, c.rms_norm_eps).to_kind(lp);
            let mlp = lin(&hn, &blk.gate).silu() * lin(&hn, &blk.up);
            x = x + lin(&mlp, &blk.down).to_kind(Kind::Float);
        }
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps).to_kind(lp);
        lin(&x, self.lm_head.as_ref().unwrap_or(&self.embed)).to_kind(Kind::Float)
    }
}

impl Architecture for Llama {
    fn forward(&self, tokens: &Tensor) -> Tensor {
        self.logits(tokens)
    }
}

/// `weight * x * rsqrt(mean(x^2) + eps)` over the last dimension, in fp32 (Hugging Face's
/// `LlamaRMSNorm`).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (x * (var + eps).rsqrt())
}

/// cos and sin tables `[seq, head_width]` of the rotary embedding at positions `0..seq`
/// (Hugging Face's `LlamaRotaryEmbedding` with default rope).
fn rotary(seq: i64, hd: i64, theta: f64, dev: tch::Device) -> (Tensor, Tensor) {
    let exponent =
        Tensor::arange_start_step(0, hd, 2, (Kind::Int64, dev)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::from(theta as f32)
        .to_device(dev)
        .pow(&exponent)
        .reciprocal();
    let pos = Tensor::arange(seq, (Kind::Int64, dev)).to_kind(Kind::Float);
    let freqs = pos.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, seq, head_width]`.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            head_dim: None,
            hidden_act: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: None,
            mlp_bias: None,
        }
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let dir = std::env::temp_dir().join(format!("dtrain-llama-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        let mut v = serde_json::to_value(tiny()).unwrap();
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
        v.as_object_mut().unwrap().remove("rope_theta");
        v["dtype"] = "float32".into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert_eq!(LlamaConfig::from_file(&p).unwrap().rope_theta, 500000.0);
        v["rope_parameters"]["rope_type"] = "yarn".into();
        std::fs::write(&p, v.to_string()).unwrap();
        let e = LlamaConfig::from_file(&p).unwrap_err();
        assert!(e.contains("config.json") && e.contains("rope_type"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        assert!(tiny().validate().is_ok());
        let mut c = tiny();
        c.hidden_size = 30;
        assert!(c.validate().unwrap_err().contains("num_attention_heads"));
        let mut c = tiny();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().contains("num_key_value_heads"));
        let mut c = tiny();
        c.vocab_size = 0;
        assert!(c.validate().unwrap_err().contains("vocab_size"));
        let mut c = tiny();
        c.vocab_size = u32::MAX;
        c.hidden_size = 1 << 16;
        c.num_attention_heads = 1 << 8;
        assert!(c.validate().unwrap_err().contains("parameters"));
        let mut c = tiny();
        c.rope_scaling = Some(serde_json::json!({"type": "linear"}));
        assert!(c.validate().unwrap_err().contains("rope_scaling"));
    }

    #[test]
    fn causal_logits_ignore_the_future() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = super::super::with_seed(0, || Llama::new(&vs.root(), &tiny()));
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
        let (la, lb) = (m.logits(&a), m.logits(&b));
        assert_eq!(la.size(), vec![1, 6, 64]);
        let diff_past = (la.narrow(1, 0, 3) - lb.narrow(1, 0, 3))
            .abs()
            .max()
            .double_value(&[]);
        let diff_future = (la.narrow(1, 3, 3) - lb.narrow(1, 3, 3))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff_past, 0.0);
        assert!(diff_future > 0.0);
    }
}
