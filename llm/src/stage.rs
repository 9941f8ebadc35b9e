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
use crate::placement::{DecodePolicy, TeamPool};

mod batch;
use batch::{plan_decodes, Input};

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
    /// Threads the next decode runs on (at most `policy`'s).
    threads: i32,
    /// How decodes use threads ([`Stage::set_policy`]).
    policy: DecodePolicy,
    /// The CPU masks of `policy`'s team, attached to the context; dropped after it.
    team: Option<TeamPool>,
    /// Whether a pinned team's decode left the decoding thread pinned to its first core.
    caller_pinned: bool,
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
                policy: DecodePolicy::Team {
                    threads: threads.max(1) as u32,
                },
                team: None,
                caller_pinned: false,
                is_last,
            })
        }
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Token ids the model knows (the first stage takes ids below this).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Run tokens (first stage) at positions `pos0..` of sequence 0.
    pub fn forward_tokens(&mut self, tokens: &[i32], pos0: i32) -> Result<StageOutput, LlmError> {
        self.forward(Input::Tokens(tokens), pos0)
    }

    /// Run hidden states from the previous stage ([n_tokens, n_embd]) at positions `pos0..` of
    /// sequence 0.
    pub fn forward_hidden(&mut self, hidden: &[f32], pos0: i32) -> Result<StageOutput, LlmError> {
        if hidden.is_empty() || !hidden.len().is_multiple_of(self.n_embd) {
            return Err(LlmError::Decode(format!(
                "{} floats is not a whole number of {}-wide rows",
                hidden.len(),
                self.n_embd
            )));
        }
        self.forward(Input::Hidden(hidden), pos0)
    }

    /// Forget the KV cache (a new session).
    pub fn clear(&mut self) {
        // SAFETY: a valid context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
    }

    /// Run decodes under `policy` from now on ([`crate::placement`]): its team's CPU masks
    /// go to the context (a pinned team starts `offset` CPUs along, so co-located stages on a
    /// machine with cores enough get cores of their own), and decodes use its threads. Call it
    /// on the thread that decodes. Returns the CPUs the team runs on (none for one thread).
    pub fn set_policy(
        &mut self,
        policy: DecodePolicy,
        offset: usize,
    ) -> Result<Vec<usize>, LlmError> {
        let team = TeamPool::for_policy(policy, offset)?;
        // SAFETY: a valid context; the old pool is dropped only after the new one replaced it
        // (or the context let go of it), and self.team is dropped after llama_free.
        unsafe {
            match &team {
                Some(pool) => pool.attach(self.ctx.as_ptr()),
                None => sys::llama_detach_threadpool(self.ctx.as_ptr()),
            }
        }
        let cpus = team.as_ref().map_or_else(Vec::new, |t| t.cpus().to_vec());
        let most = team.as_ref().map_or(1, TeamPool::threads);
        self.team = team;
        self.policy = policy;
        self.apply_threads((policy.threads() as i32).min(most));
        Ok(cpus)
    }

    /// How decodes use threads now.
    pub fn policy(&self) -> DecodePolicy {
        self.policy
    }

    /// The threads the next decodes use (llama.cpp's `n_threads` and `n_threads_batch`), at
    /// most the policy's: fewer when stages that work at once share the machine's cores.
    pub fn set_threads(&mut self, threads: i32) {
        // A team's pool has masks for so many threads; without a pool ggml makes one per
        // compute, of any size.
        let policy = self.policy.threads() as i32;
        let most = self
            .team
            .as_ref()
            .map_or(policy, |t| t.threads().min(policy));
        let threads = threads.clamp(1, most.max(1));
        if threads != self.threads {
            self.apply_threads(threads);
        }
    }

    fn apply_threads(&mut self, threads: i32) {
        // SAFETY: a valid context.
        unsafe { sys::llama_set_n_threads(self.ctx.as_ptr(), threads, threads) };
        self.threads = threads;
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
        self.forward_rows(Input::Tokens(tokens), rows, None)
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
        self.forward_rows(Input::Hidden(hidden), rows, None)
    }

    /// A last stage's logits at each of `rows` where `want` says, in row order, for `tokens`
    /// (a one-stage model) or `hidden` states: what the coordinator needs to check the token
    /// sampled at every position of a served request.
    pub fn logits_at(
        &mut self,
        tokens: Option<&[i32]>,
        hidden: &[f32],
        rows: &[Row],
        want: &[bool],
    ) -> Result<Vec<Vec<f32>>, LlmError> {
        let input = match tokens {
            Some(t) if t.len() == rows.len() => Input::Tokens(t),
            None if hidden.len() == rows.len() * self.n_embd => Input::Hidden(hidden),
            _ => return Err(LlmError::Decode("input and rows differ in length".into())),
        };
        if !self.is_last || want.len() != rows.len() {
            return Err(LlmError::Decode(
                "logits at chosen rows: a last stage, one choice per row".into(),
            ));
        }
        match self.forward_rows(input, rows, Some(want))? {
            RowsOutput::Logits(l) => Ok(l.into_iter().map(|(_, l)| l).collect()),
            RowsOutput::Hidden(_) => {
                Err(LlmError::Decode("a last stage gave hidden states".into()))
            }
        }
    }

    /// Run `input` at positions `pos0..` of sequence 0.
    fn forward(&mut self, input: Input<'_>, pos0: i32) -> Result<StageOutput, LlmError> {
        let n = input.len(self.n_embd) as i32;
        let rows: Vec<Row> = (pos0..pos0 + n).map(|pos| Row { seq: 0, pos }).collect();
        Ok(match self.forward_rows(input, &rows, None)? {
            RowsOutput::Hidden(h) => StageOutput::Hidden(h),
            RowsOutput::Logits(mut l) => StageOutput::Logits(
                l.pop()
                    .map(|(_, logits)| logits)
                    .ok_or_else(|| LlmError::Decode("no logits".into()))?,
            ),
        })
    }

    /// Run `input` (one token or one hidden state per row) at `rows`, which may belong to
    /// several sequences (each one run of consecutive rows), in decodes of at most
    /// [`CHUNK_TOKENS`] rows.
    ///
    /// Why the decodes are planned here: with a KV cache per sequence, llama.cpp cuts a batch
    /// into micro-batches of equal length per sequence (`split_equal`), taking only runs of
    /// consecutive, increasing sequence ids. A batch of sequence 0 with 13 rows and sequence 1
    /// with 5 runs as [0's first 5, 1's 5] then [0's other 8], so the captured `l_out` rows
    /// would come in another order than the rows went in, and the next stage would run one
    /// sequence's states as another's (garbage text, found with 16 streams at once). Each decode
    /// here therefore holds runs of one length in increasing sequence order, which
    /// `split_equal` keeps as they are; a run longer than a decode goes alone, in chunks.
    ///
    /// `want` (a last stage) names the rows whose logits to give instead of each sequence's
    /// last.
    fn forward_rows(
        &mut self,
        input: Input<'_>,
        rows: &[Row],
        want: Option<&[bool]>,
    ) -> Result<RowsOutput, LlmError> {
        let n = rows.len();
        if n == 0 {
            return Err(LlmError::Decode("empty batch".into()));
        }
        let decodes = plan_decodes(rows)?;
        let mut hidden = if self.capture.is_some() {
            vec![0f32; n * self.n_embd]
        } else {
            Vec::new()
        };
        let mut logits: Vec<(usize, i32, Vec<f32>)> = Vec::new();
        for indices in decodes {
            let part_rows: Vec<Row> = indices.iter().map(|&i| rows[i]).collect();
            let part_input = input.gather(&indices, self.n_embd);
            // The last stage outputs the logits of each sequence's last row only.
            let outputs: Vec<bool> = indices
                .iter()
                .map(|&i| match want {
                    Some(want) => want[i],
                    None => !self.is_last || i + 1 == n || rows[i + 1].seq != rows[i].seq,
                })
                .collect();
            if let Some(c) = self.capture.as_mut() {
                c.data.clear();
            }
            let ret = self.decode(part_input.as_input(), &part_rows, &outputs);
            match &self.capture {
                None if ret != 0 => {
                    return Err(LlmError::Decode(format!("llama_decode returned {ret}")))
                }
                None => {
                    for (j, &i) in indices.iter().enumerate() {
                        if outputs[j] {
                            logits.push((i, rows[i].seq, self.logits(j as i32)?));
                        }
                    }
                }
                Some(c) if c.data.len() != indices.len() * self.n_embd => {
                    return Err(LlmError::Decode(format!(
                        "captured {} floats of {} for {} rows (llama_decode returned {ret})",
                        c.data.len(),
                        c.name.to_string_lossy(),
                        indices.len()
                    )));
                }
                Some(c) => {
                    let w = self.n_embd;
                    for (j, &i) in indices.iter().enumerate() {
                        hidden[i * w..(i + 1) * w].copy_from_slice(&c.data[j * w..(j + 1) * w]);
                    }
                }
            }
        }
        Ok(if self.capture.is_some() {
            RowsOutput::Hidden(hidden)
        } else {
            logits.sort_by_key(|(i, _, _)| *i);
            RowsOutput::Logits(logits.into_iter().map(|(_, seq, l)| (seq, l)).collect())
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
            if self.threads <= 1 && self.caller_pinned {
                // ggml leaves the decoding thread on the pinned team's first core; a decode
                // on one thread has no team to spread and may run anywhere.
                crate::placement::unpin_current_thread(crate::placement::allowed_cpus());
                self.caller_pinned = false;
            }
            let ret = sys::llama_decode(self.ctx.as_ptr(), batch);
            if self.threads > 1 {
                self.caller_pinned = matches!(self.policy, DecodePolicy::Pinned { .. });
            }
            sys::llama_batch_free(batch);
            ret
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
