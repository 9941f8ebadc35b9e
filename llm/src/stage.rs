//! One pipeline stage in llama.cpp: a stage shard that takes tokens (the first stage) or the
//! previous stage's hidden states, runs its layers, and gives its own hidden states (or, on the
//! last stage, logits).
//!
//! The safe llama-cpp-2 API cannot do this (its batches take only tokens, and it has no
//! `cb_eval` setter), so this is a small safe wrapper over llama-cpp-sys-2 (design.md,
//! Inference): hidden states go in through `llama_batch.embd`; a non-final stage captures
//! `l_out-<last layer>` (before `output_norm`) in the scheduler's eval callback, copies it out
//! there, and stops the graph, so it never computes an output head it does not need. Every
//! token of a non-final stage's batch is marked as an output, or the last layer would keep
//! only the output rows.

use std::ffi::{c_void, CString};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::backend::{backend, LlmError};

/// The most positions one `llama_decode` takes (llama.cpp's default micro-batch). llama.cpp
/// keeps an n_vocab-wide logits row for every output of a decode, and a non-final stage outputs
/// every token: a 4000-token prompt in one decode took stage 0 of SmolLM2 (4 stages) to 1013 MB
/// peak resident and 9.0 s; in chunks of 512, 222 MB and 6.3 s, with the same hidden states.
pub const CHUNK_TOKENS: usize = 512;

/// What the eval callback is after, and what it found.
struct Capture {
    /// `l_out-<k>` with k the stage's last local layer.
    name: CString,
    /// f32 [n_tokens, n_embd] row-major, appended per micro-batch.
    data: Vec<f32>,
}

/// The scheduler's eval callback: ask for `l_out-<last>`, copy it, stop the graph.
unsafe extern "C" fn capture_last_layer(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    // SAFETY: llama.cpp passes the user data we registered (a live `Capture`) and a valid tensor.
    let capture = unsafe { &mut *(user as *mut Capture) };
    let name = unsafe { std::ffi::CStr::from_ptr(sys::ggml_get_name(t)) };
    let wanted = name == capture.name.as_c_str();
    if ask {
        return wanted;
    }
    if wanted {
        // SAFETY: the tensor is computed (ask == false) and holds nbytes of f32.
        unsafe {
            let bytes = sys::ggml_nbytes(t);
            let start = capture.data.len();
            capture.data.resize(start + bytes / 4, 0.0);
            sys::ggml_backend_tensor_get(t, capture.data[start..].as_mut_ptr().cast(), 0, bytes);
        }
        return false; // nothing after this layer is needed on a non-final stage
    }
    true
}

/// A loaded stage with its own context (and so its own KV cache).
pub struct Stage {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    /// Boxed so the pointer given to llama.cpp stays put.
    capture: Option<Box<Capture>>,
    n_embd: usize,
    n_vocab: usize,
    /// Positions each sequence holds.
    context: u32,
    sequences: u32,
    threads: i32,
    /// Whether this stage outputs logits (the last stage) rather than hidden states.
    pub is_last: bool,
}

// SAFETY: a Stage is used from one thread at a time (&mut self for every call); llama.cpp
// models and contexts may move between threads.
unsafe impl Send for Stage {}

/// Output of one forward pass.
pub enum StageOutput {
    /// Hidden states, [n_tokens, n_embd] row-major.
    Hidden(Vec<f32>),
    /// Logits of the last token.
    Logits(Vec<f32>),
}

/// One row of a batch of several sequences: which sequence, at which position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub seq: i32,
    pub pos: i32,
}

/// Output of [`Stage::forward_rows`].
pub enum RowsOutput {
    /// Hidden states of every row, [rows, n_embd] row-major, in the rows' order.
    Hidden(Vec<f32>),
    /// For each sequence in the batch, the logits of its last row, in the order in which the
    /// sequences' last rows come.
    Logits(Vec<(i32, Vec<f32>)>),
}

impl Stage {
    /// Load `path` as a stage. `is_last` stages give logits; others capture their last layer.
    /// The context is the model's trained context length (from the GGUF), at most `max_ctx`.
    pub fn load(path: &Path, is_last: bool, max_ctx: u32, threads: i32) -> Result<Stage, LlmError> {
        Stage::load_for(path, is_last, max_ctx, threads, 1)
    }

    /// [`Stage::load`] for `sequences` sequences at once, each with its own KV cache of the
    /// same context (llama.cpp's `n_seq_max`, not unified): rows of several sequences then go
    /// through one `llama_decode` ([`Stage::forward_rows`]).
    pub fn load_for(
        path: &Path,
        is_last: bool,
        max_ctx: u32,
        threads: i32,
        sequences: u32,
    ) -> Result<Stage, LlmError> {
        backend()?;
        let err = |message: String| LlmError::Load {
            path: path.display().to_string(),
            message,
        };
        // A stage that would not compute what its layers did in the whole model is refused
        // here, before llama.cpp sees it: serving wrong text silently is the worst failure.
        let header = torrents::gguf::GgufModel::open(path).map_err(|e| err(e.to_string()))?;
        let findings = torrents::arch::check_stage(&header);
        if !findings.problems.is_empty() {
            return Err(err(findings.problems.join("; ")));
        }
        for warning in findings.warnings {
            tracing::warn!("{}: {warning}", path.display());
        }
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| err(e.to_string()))?;
        // SAFETY: plain FFI calls with valid arguments; results are checked for null.
        unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = 0;
            let model = NonNull::new(sys::llama_model_load_from_file(c_path.as_ptr(), mp))
                .ok_or_else(|| err("llama_model_load_from_file failed".into()))?;
            let n_layer = sys::llama_model_n_layer(model.as_ptr());
            let n_embd = sys::llama_model_n_embd(model.as_ptr()) as usize;
            let vocab = sys::llama_model_get_vocab(model.as_ptr());
            let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
            let mut capture = (!is_last).then(|| {
                Box::new(Capture {
                    name: CString::new(format!("l_out-{}", n_layer - 1)).unwrap(),
                    data: Vec::new(),
                })
            });
            let trained = u32::try_from(sys::llama_model_n_ctx_train(model.as_ptr())).unwrap_or(0);
            let n_ctx = protocol::data::stage_context(trained).min(max_ctx);
            let mut cp = sys::llama_context_default_params();
            let sequences = sequences.max(1);
            cp.n_seq_max = sequences;
            cp.kv_unified = false;
            cp.n_ctx = n_ctx * sequences;
            cp.n_batch = CHUNK_TOKENS as u32;
            cp.n_ubatch = CHUNK_TOKENS as u32;
            cp.n_threads = threads;
            cp.n_threads_batch = threads;
            if let Some(c) = capture.as_mut() {
                cp.cb_eval = Some(capture_last_layer);
                cp.cb_eval_user_data = (c.as_mut() as *mut Capture).cast();
            }
            let Some(ctx) = NonNull::new(sys::llama_init_from_model(model.as_ptr(), cp)) else {
                sys::llama_model_free(model.as_ptr());
                return Err(err("llama_init_from_model failed".into()));
            };
            Ok(Stage {
                model,
                ctx,
                capture,
                n_embd,
                n_vocab,
                context: n_ctx,
                sequences,
                threads,
                is_last,
            })
        }
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Run tokens (first stage) at positions `pos0..` of sequence 0.
    pub fn forward_tokens(&mut self, tokens: &[i32], pos0: i32) -> Result<StageOutput, LlmError> {
        self.forward_tokens_of(0, tokens, pos0)
    }

    /// Run hidden states from the previous stage ([n_tokens, n_embd]) at positions `pos0..` of
    /// sequence 0.
    pub fn forward_hidden(&mut self, hidden: &[f32], pos0: i32) -> Result<StageOutput, LlmError> {
        self.forward_hidden_of(0, hidden, pos0)
    }

    /// Run tokens at positions `pos0..` of sequence `seq`.
    pub fn forward_tokens_of(
        &mut self,
        seq: i32,
        tokens: &[i32],
        pos0: i32,
    ) -> Result<StageOutput, LlmError> {
        self.forward(Input::Tokens(tokens), seq, pos0)
    }

    /// Run hidden states ([n_tokens, n_embd]) at positions `pos0..` of sequence `seq`.
    pub fn forward_hidden_of(
        &mut self,
        seq: i32,
        hidden: &[f32],
        pos0: i32,
    ) -> Result<StageOutput, LlmError> {
        if hidden.is_empty() || !hidden.len().is_multiple_of(self.n_embd) {
            return Err(LlmError::Decode(format!(
                "{} floats is not a whole number of {}-wide rows",
                hidden.len(),
                self.n_embd
            )));
        }
        self.forward(Input::Hidden(hidden), seq, pos0)
    }

    /// Forget the KV cache (a new session).
    pub fn clear(&mut self) {
        // SAFETY: a valid context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
    }

    /// The threads the next decodes use (llama.cpp's `n_threads` and `n_threads_batch`).
    pub fn set_threads(&mut self, threads: i32) {
        let threads = threads.max(1);
        if threads != self.threads {
            // SAFETY: a valid context.
            unsafe { sys::llama_set_n_threads(self.ctx.as_ptr(), threads, threads) };
            self.threads = threads;
        }
    }

    /// Positions each sequence holds (its context).
    pub fn context(&self) -> u32 {
        self.context
    }

    /// Sequences the stage keeps at once.
    pub fn sequences(&self) -> u32 {
        self.sequences
    }

    /// Forget sequence `seq`'s positions from `pos0` on, keeping those before: the cached
    /// prefix a new request reuses, or the state a replayed step starts from.
    pub fn truncate_sequence(&mut self, seq: i32, pos0: i32) -> Result<(), LlmError> {
        // SAFETY: a valid context; llama.cpp checks the sequence id.
        let ok = unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, pos0, -1)
        };
        if ok {
            Ok(())
        } else {
            Err(LlmError::Decode(format!(
                "cannot forget positions {pos0}.. of sequence {seq}"
            )))
        }
    }

    /// Forget one sequence's KV cache (its slot is free for another).
    pub fn clear_sequence(&mut self, seq: i32) {
        // SAFETY: a valid context; removing a whole sequence never fails.
        unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, -1, -1);
        }
    }

    /// Run tokens (first stage) at `rows`, one token per row.
    pub fn forward_token_rows(
        &mut self,
        tokens: &[i32],
        rows: &[Row],
    ) -> Result<RowsOutput, LlmError> {
        if tokens.len() != rows.len() {
            return Err(LlmError::Decode(format!(
                "{} tokens for {} rows",
                tokens.len(),
                rows.len()
            )));
        }
        self.forward_rows(Input::Tokens(tokens), rows)
    }

    /// Run hidden states ([rows, n_embd]) at `rows`.
    pub fn forward_hidden_rows(
        &mut self,
        hidden: &[f32],
        rows: &[Row],
    ) -> Result<RowsOutput, LlmError> {
        if hidden.len() != rows.len() * self.n_embd {
            return Err(LlmError::Decode(format!(
                "{} floats for {} rows of {}",
                hidden.len(),
                rows.len(),
                self.n_embd
            )));
        }
        self.forward_rows(Input::Hidden(hidden), rows)
    }

    fn forward(&mut self, input: Input<'_>, seq: i32, pos0: i32) -> Result<StageOutput, LlmError> {
        let n = input.len(self.n_embd) as i32;
        let rows: Vec<Row> = (pos0..pos0 + n).map(|pos| Row { seq, pos }).collect();
        Ok(match self.forward_rows(input, &rows)? {
            RowsOutput::Hidden(h) => StageOutput::Hidden(h),
            RowsOutput::Logits(mut l) => StageOutput::Logits(
                l.pop()
                    .map(|(_, logits)| logits)
                    .ok_or_else(|| LlmError::Decode("no logits".into()))?,
            ),
        })
    }

    /// Run `input` (one token or one hidden state per row) at `rows`, which may belong to
    /// several sequences, in decodes of at most [`CHUNK_TOKENS`] rows.
    fn forward_rows(&mut self, input: Input<'_>, rows: &[Row]) -> Result<RowsOutput, LlmError> {
        let n = rows.len();
        if n == 0 {
            return Err(LlmError::Decode("empty batch".into()));
        }
        // The last stage outputs the logits of each sequence's last row only: walking back,
        // a row is its sequence's last when that sequence has not been seen yet.
        let mut outputs = vec![!self.is_last; n];
        if self.is_last {
            let mut seen = std::collections::HashSet::new();
            for (i, row) in rows.iter().enumerate().rev() {
                outputs[i] = seen.insert(row.seq);
            }
        }
        if let Some(c) = self.capture.as_mut() {
            c.data.clear();
        }
        let mut logits = Vec::new();
        // A long prompt goes through in chunks: llama.cpp sizes its logits buffer by the
        // outputs of one decode, and a non-final stage outputs every token.
        for start in (0..n).step_by(CHUNK_TOKENS) {
            let end = (start + CHUNK_TOKENS).min(n);
            let ret = self.decode(
                input.slice(start, end, self.n_embd),
                &rows[start..end],
                &outputs[start..end],
            );
            match &self.capture {
                None if ret != 0 => {
                    return Err(LlmError::Decode(format!("llama_decode returned {ret}")))
                }
                None => {
                    for (j, row) in rows[start..end].iter().enumerate() {
                        if outputs[start + j] {
                            logits.push((row.seq, self.logits(j as i32)?));
                        }
                    }
                }
                Some(c) if c.data.len() != end * self.n_embd => {
                    return Err(LlmError::Decode(format!(
                        "captured {} floats of {} for {end} tokens (llama_decode returned {ret})",
                        c.data.len(),
                        c.name.to_string_lossy()
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(match &mut self.capture {
            Some(c) => RowsOutput::Hidden(std::mem::take(&mut c.data)),
            None => RowsOutput::Logits(logits),
        })
    }

    /// The logits of output row `i` of the last decode.
    fn logits(&self, i: i32) -> Result<Vec<f32>, LlmError> {
        // SAFETY: n_vocab floats of a row the last decode marked as an output.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), i);
            if p.is_null() {
                return Err(LlmError::Decode(format!("no logits for row {i}")));
            }
            Ok(std::slice::from_raw_parts(p, self.n_vocab).to_vec())
        }
    }

    /// One `llama_decode` of at most [`CHUNK_TOKENS`] rows, each output where `outputs` says.
    fn decode(&mut self, input: Input<'_>, rows: &[Row], outputs: &[bool]) -> i32 {
        let n = rows.len();
        let embd = match input {
            Input::Hidden(_) => self.n_embd as i32,
            Input::Tokens(_) => 0,
        };
        // SAFETY: the batch is allocated for n tokens (and n * n_embd floats when embd > 0),
        // filled within those bounds, decoded, and freed.
        unsafe {
            let mut batch = sys::llama_batch_init(n as i32, embd, 1);
            batch.n_tokens = n as i32;
            match input {
                Input::Tokens(t) => std::ptr::copy_nonoverlapping(t.as_ptr(), batch.token, n),
                Input::Hidden(h) => std::ptr::copy_nonoverlapping(h.as_ptr(), batch.embd, h.len()),
            }
            for (i, row) in rows.iter().enumerate() {
                *batch.pos.add(i) = row.pos;
                *batch.n_seq_id.add(i) = 1;
                **batch.seq_id.add(i) = row.seq;
                *batch.logits.add(i) = i8::from(outputs[i]);
            }
            let ret = sys::llama_decode(self.ctx.as_ptr(), batch);
            sys::llama_batch_free(batch);
            ret
        }
    }
}

#[derive(Clone, Copy)]
enum Input<'a> {
    Tokens(&'a [i32]),
    Hidden(&'a [f32]),
}

impl<'a> Input<'a> {
    fn len(&self, n_embd: usize) -> usize {
        match self {
            Input::Tokens(t) => t.len(),
            Input::Hidden(h) => h.len() / n_embd,
        }
    }

    /// Positions `start..end`.
    fn slice(&self, start: usize, end: usize, n_embd: usize) -> Input<'a> {
        match *self {
            Input::Tokens(t) => Input::Tokens(&t[start..end]),
            Input::Hidden(h) => Input::Hidden(&h[start * n_embd..end * n_embd]),
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // SAFETY: freeing what load() created, context first.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

/// The index of the largest logit (greedy sampling); ties go to the lowest index, as
/// llama.cpp's greedy sampler does.
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as i32
}
