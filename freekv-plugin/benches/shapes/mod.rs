//! The attention shapes the CPU benchmarks measure.

/// Query heads, KV heads and head dimension of one model's attention layers.
#[derive(Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub q: usize,
    pub kv: usize,
    pub d: usize,
}

pub const LLAMA: Shape = Shape {
    name: "Llama-3.1-8B (32/8 heads, d 128)",
    q: 32,
    kv: 8,
    d: 128,
};

pub const SMOL: Shape = Shape {
    name: "SmolLM2-135M (9/3 heads, d 64)",
    q: 9,
    kv: 3,
    d: 64,
};
