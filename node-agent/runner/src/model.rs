//! The built-in models.

use edgeloom_crds::workload::BuiltinModel;
use tch::nn::{self, Module};

/// Why a model cannot be built for the data.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

/// Builds `kind` for `features` inputs and `classes` outputs under `p`.
pub fn builtin(
    p: &nn::Path,
    kind: BuiltinModel,
    features: i64,
    classes: i64,
) -> Result<nn::Sequential, ModelError> {
    Ok(match kind {
        BuiltinModel::Linear => {
            nn::seq().add(nn::linear(p / "fc", features, classes, Default::default()))
        }
        BuiltinModel::Mlp => nn::seq()
            .add(nn::linear(p / "fc1", features, 128, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(p / "fc2", 128, 64, Default::default()))
            .add_fn(|x| x.relu())
            .add(nn::linear(p / "fc3", 64, classes, Default::default())),
        BuiltinModel::Cnn => {
            let side = (features as f64).sqrt() as i64;
            if side * side != features || side < 2 {
                return Err(ModelError(format!(
                    "the Cnn model needs square images; {features} features is not a square"
                )));
            }
            let conv = nn::ConvConfig {
                padding: 1,
                ..Default::default()
            };
            let pooled = (side / 2) * (side / 2) * 32;
            nn::seq()
                .add_fn(move |x| x.view([-1, 1, side, side]))
                .add(nn::conv2d(p / "c1", 1, 16, 3, conv))
                .add_fn(|x| x.relu())
                .add(nn::conv2d(p / "c2", 16, 32, 3, conv))
                .add_fn(|x| x.relu().max_pool2d_default(2))
                .add_fn(move |x| x.view([-1, pooled]))
                .add(nn::linear(p / "fc1", pooled, 64, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(p / "fc2", 64, classes, Default::default()))
        }
    })
}

/// A trainable network: built in, or a TorchScript module whose parameters live in the
/// same VarStore (so optimisers and checkpoints treat both alike).
pub enum Net {
    /// A built-in model.
    Builtin(nn::Sequential),
    /// A TorchScript model.
    Script(tch::TrainableCModule),
}

impl Net {
    /// Loads a TorchScript model's parameters into `p` for training.
    pub fn script(path: &str, p: nn::Path) -> Result<Net, tch::TchError> {
        let mut m = tch::TrainableCModule::load(path, p)?;
        m.set_train();
        Ok(Net::Script(m))
    }

    /// The forward pass (building a graph).
    pub fn forward(&self, x: &tch::Tensor) -> Result<tch::Tensor, tch::TchError> {
        match self {
            Net::Builtin(s) => Ok(s.forward(x)),
            Net::Script(m) => m.forward_ts(&[x]),
        }
    }

    /// Logits for `x` in evaluation mode without building a graph.
    pub fn logits(&mut self, x: &tch::Tensor) -> Result<tch::Tensor, tch::TchError> {
        if let Net::Script(m) = self {
            m.set_eval();
        }
        tch::no_grad(|| self.forward(x))
    }
}
