//! The flat parameter layout: every parameter of a model lives in one contiguous f32 buffer, and a
//! table of named views says where each tensor sits. Gradients, AdamW moments and the weight EMA
//! use the same table over buffers of the same length, so optimizer, all-reduce, PowerSGD and
//! checkpoints are plain loops over one slice.

use std::collections::HashMap;
use std::ops::Range;

/// What a parameter is, which decides weight decay (matrices only) and, later, PowerSGD
/// compression (2-D matrices only; the rest is all-reduced uncompressed in fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A weight matrix of a linear layer (or a convolution kernel): decayed.
    Matrix,
    /// An input embedding table: not decayed.
    Embedding,
    /// An output projection onto a vocabulary: not decayed.
    Unembedding,
    /// A layernorm gain: not decayed.
    Gain,
    /// A bias: not decayed.
    Bias,
}

impl ParamKind {
    /// Whether AdamW applies weight decay to this kind.
    pub fn decayed(self) -> bool {
        matches!(self, ParamKind::Matrix)
    }
}

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Multiplies the learning rate of this tensor's Adam step; its weight decay stays
    /// lr · weight_decay. 1 unless the model asks otherwise (the dVAE's
    /// `relaxation.branch_gain: unit` sets it on the residual branches' last convolutions).
    pub lr_scale: f32,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// The ordered table of a model's parameters. Order is the order of `push`, and the views are
/// contiguous and disjoint, in that order.
#[derive(Clone, Debug, Default)]
pub struct ParamTable {
    specs: Vec<ParamSpec>,
    index: HashMap<String, usize>,
    total: usize,
}

impl ParamTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a tensor and returns its index. Names must be unique (a programming error if not).
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], kind: ParamKind) -> usize {
        let name = name.into();
        assert!(
            !self.index.contains_key(&name),
            "duplicate parameter name {name}"
        );
        let spec = ParamSpec {
            name: name.clone(),
            shape: shape.to_vec(),
            kind,
            offset: self.total,
            lr_scale: 1.0,
        };
        self.total += spec.numel();
        self.index.insert(name, self.specs.len());
        self.specs.push(spec);
        self.specs.len() - 1
    }

    /// Total number of f32 elements (the length of the flat buffers).
    pub fn numel(&self) -> usize {
        self.total
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn spec(&self, i: usize) -> &ParamSpec {
        &self.specs[i]
    }

    pub fn find(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }

    /// Sets the learning-rate multiplier of tensor `i` ([`ParamSpec::lr_scale`]).
    pub fn set_lr_scale(&mut self, i: usize, scale: f32) {
        self.specs[i].lr_scale = scale;
    }

    /// The view of tensor `i` in `buf`.
    pub fn view<'a>(&self, buf: &'a [f32], i: usize) -> &'a [f32] {
        &buf[self.specs[i].range()]
    }

    /// Splits `buf` into one disjoint mutable view per tensor, in table order.
    pub fn split_mut<'a>(&self, mut buf: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        assert_eq!(
            buf.len(),
            self.total,
            "flat buffer length does not match the table"
        );
        let mut out = Vec::with_capacity(self.specs.len());
        for s in &self.specs {
            let (head, tail) = buf.split_at_mut(s.numel());
            out.push(head);
            buf = tail;
        }
        out
    }

    /// Splits `buf` into one shared view per tensor, in table order.
    pub fn split<'a>(&self, buf: &'a [f32]) -> Vec<&'a [f32]> {
        assert_eq!(
            buf.len(),
            self.total,
            "flat buffer length does not match the table"
        );
        self.specs.iter().map(|s| &buf[s.range()]).collect()
    }
}

/// xxh3-128 of `params` as little-endian bytes: the one fingerprint of a set of weights (token
/// shards record their dVAE's, embeddings their CLIP's, ranks compare `train.init`'s).
pub fn fingerprint(params: &[f32]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut bytes = Vec::with_capacity(4 << 16);
    for chunk in params.chunks(1 << 16) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        h.update(&bytes);
    }
    h.digest128()
}

/// Two distinct mutable views, `i < j` (table order), out of a buffer split by
/// [`ParamTable::split_mut`]: a weight gradient and its bias gradient, say.
pub fn pair_mut<'a>(
    views: &'a mut [&mut [f32]],
    i: usize,
    j: usize,
) -> (&'a mut [f32], &'a mut [f32]) {
    assert!(i < j, "pair_mut expects table order");
    let (a, b) = views.split_at_mut(j);
    (&mut *a[i], &mut *b[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_contiguous_disjoint_and_named() {
        let mut t = ParamTable::new();
        t.push("a.weight", &[3, 2], ParamKind::Matrix);
        t.push("a.bias", &[3], ParamKind::Bias);
        t.push("emb", &[4, 2], ParamKind::Embedding);
        assert_eq!(t.numel(), 6 + 3 + 8);
        assert_eq!(t.find("a.bias").unwrap().range(), 6..9);
        assert!(t.find("missing").is_none());
        let mut buf: Vec<f32> = (0..t.numel()).map(|i| i as f32).collect();
        let views = t.split_mut(&mut buf);
        assert_eq!(
            views.iter().map(|v| v.len()).collect::<Vec<_>>(),
            vec![6, 3, 8]
        );
        assert_eq!(views[2][0], 9.0);
        assert!(ParamKind::Matrix.decayed() && !ParamKind::Unembedding.decayed());
    }
}
