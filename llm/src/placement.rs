//! Where a stage's decode threads run.
//!
//! llama.cpp runs a decode's threads as an OpenMP team that meets at a barrier after every
//! operation, so the team is only as fast as its slowest thread. Left to the kernel, a team's
//! threads can end up on one core while another core idles: a stage's threads sleep between
//! steps (its neighbours are working), and when they wake the kernel may put the woken worker
//! next to the thread that woke it. Kernels that pack virtual CPUs do this on purpose
//! (`sched_vcpu_pack`), and a team then loses whole milliseconds per token (the numbers are
//! in `bench/NOTES.md`). Pinning thread `j` of a team to its own core, as llama.cpp's
//! `--cpu-strict` does, removes that there. ggml applies the pinning itself at every graph compute when a
//! context has a thread pool whose workers carry CPU masks (the OpenMP build included), so a
//! stage attaches one ([`TeamPool`]).
//!
//! That is one machine. Elsewhere a pinned team can be the slow choice, and one thread the
//! fast one: [`DecodePolicy`] names the candidates, and [`crate::calibrate`] measures them.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::LlmError;

/// The CPUs this process may run on, in increasing order: its main thread's affinity mask
/// when first asked (all online CPUs unless a launcher such as `taskset` or systemd's
/// `CPUAffinity=` narrowed it). Read once, so a pinned thread asking later still gets the
/// process's CPUs rather than its own.
pub fn allowed_cpus() -> &'static [usize] {
    static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    // SAFETY: getpid has no preconditions; the main thread's id is the process id.
    ALLOWED.get_or_init(|| cpus_of(unsafe { libc::getpid() }))
}

/// The CPUs the calling thread may run on now.
pub fn current_thread_cpus() -> Vec<usize> {
    cpus_of(0)
}

/// The affinity mask of thread `tid` (0: the calling thread), or nothing if it cannot be read.
fn cpus_of(tid: libc::pid_t) -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// The `threads` CPUs a team starts on: consecutive allowed CPUs from the `offset`-th (mod the
/// allowed count), so stages pinned with offsets `stage × threads` on a machine with enough
/// cores get cores of their own. With fewer allowed CPUs than threads, every allowed CPU.
pub fn cpus_for(allowed: &[usize], threads: usize, offset: usize) -> Vec<usize> {
    if allowed.is_empty() {
        return Vec::new();
    }
    let mut cpus: Vec<usize> = (0..threads.min(allowed.len()))
        .map(|i| allowed[(offset + i) % allowed.len()])
        .collect();
    cpus.sort_unstable();
    cpus
}

/// Let the calling thread run on any of `cpus` again (a decode that runs on one thread has
/// no team to spread, and ggml leaves the thread pinned from the last team decode).
pub fn unpin_current_thread(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        // Failure leaves the thread where it was: slower at worst, never wrong.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// How a stage runs each decode's threads. Which one is fastest depends on the machine (its
/// kernel's scheduler, the hypervisor, what else runs there) as much as on the model: on one
/// VM of a kind a pinned team was the fastest, on the next 2.3x slower than one thread. So a
/// node measures the candidates ([`crate::calibrate`]) instead of trusting a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodePolicy {
    /// Every decode on the decoding thread alone: no team, no barriers.
    One,
    /// An OpenMP team of `threads`, each free to run on any allowed CPU.
    Team { threads: u32 },
    /// A team of `threads` (at most the allowed CPUs), thread `j` pinned to a core of its own,
    /// as llama.cpp's `--cpu-strict` does.
    Pinned { threads: u32 },
}

impl DecodePolicy {
    /// The most threads a decode runs on.
    pub fn threads(self) -> u32 {
        match self {
            DecodePolicy::One => 1,
            DecodePolicy::Team { threads } | DecodePolicy::Pinned { threads } => threads.max(1),
        }
    }

    /// A short name for logs, `/status` and metrics: `one`, `team` or `team-pinned`.
    pub fn name(self) -> &'static str {
        match self {
            DecodePolicy::One => "one",
            DecodePolicy::Team { .. } => "team",
            DecodePolicy::Pinned { .. } => "team-pinned",
        }
    }
}

impl std::fmt::Display for DecodePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            DecodePolicy::One => write!(f, "one thread"),
            DecodePolicy::Team { threads } => write!(f, "a team of {threads} threads"),
            DecodePolicy::Pinned { threads } => write!(f, "a team of {threads} pinned threads"),
        }
    }
}

/// A ggml thread pool attached to a stage's context. Under OpenMP it holds no threads of its
/// own, only the CPU mask ggml gives thread `j` of a team at every graph compute: one core
/// each for a pinned team, every allowed CPU for a free one (which also undoes an earlier
/// pinning of the same OpenMP threads).
pub struct TeamPool {
    pool: NonNull<sys::ggml_threadpool>,
    threads: i32,
    cpus: Vec<usize>,
}

// SAFETY: the pool is only read by ggml during a compute of the context it is attached to,
// which runs on the thread that owns the Stage.
unsafe impl Send for TeamPool {}

impl TeamPool {
    /// A pool for `policy`'s team: pinned teams take `cpus_for(allowed, threads, offset)`,
    /// free teams every allowed CPU. None for [`DecodePolicy::One`], which has no team.
    pub fn for_policy(policy: DecodePolicy, offset: usize) -> Result<Option<TeamPool>, LlmError> {
        let allowed = allowed_cpus();
        match policy {
            DecodePolicy::One => Ok(None),
            DecodePolicy::Team { threads } => {
                TeamPool::new(allowed, threads as usize, false).map(Some)
            }
            DecodePolicy::Pinned { threads } => {
                let cpus = cpus_for(allowed, threads as usize, offset);
                TeamPool::new(&cpus, cpus.len(), true).map(Some)
            }
        }
    }

    /// A pool of `threads` threads on `cpus` (increasing): thread `j` on `cpus[j]` when
    /// `strict`, else each on any of them.
    fn new(cpus: &[usize], threads: usize, strict: bool) -> Result<TeamPool, LlmError> {
        // SAFETY: plain FFI; the params are initialised by ggml before we set fields.
        unsafe {
            let mut params = sys::ggml_threadpool_params_default(threads.max(1) as i32);
            let slots = params.cpumask.len();
            if cpus.is_empty() || cpus.iter().any(|&c| c >= slots) {
                return Err(LlmError::Decode(format!(
                    "cannot place threads on CPUs {cpus:?}"
                )));
            }
            params.cpumask = [false; _];
            for &cpu in cpus {
                params.cpumask[cpu] = true;
            }
            params.strict_cpu = strict;
            let pool = NonNull::new(sys::ggml_threadpool_new(&mut params))
                .ok_or_else(|| LlmError::Decode("ggml_threadpool_new failed".into()))?;
            Ok(TeamPool {
                pool,
                threads: params.n_threads,
                cpus: cpus.to_vec(),
            })
        }
    }

    /// Threads the pool has masks for: a decode may use at most this many.
    pub fn threads(&self) -> i32 {
        self.threads
    }

    /// The CPUs the team runs on.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// Make `ctx`'s decodes run on this pool's CPUs. The pool must outlive the attachment.
    ///
    /// # Safety
    /// `ctx` is a valid context, freed or detached before this pool is dropped.
    pub(crate) unsafe fn attach(&self, ctx: *mut sys::llama_context) {
        // SAFETY: per the contract above.
        unsafe { sys::llama_attach_threadpool(ctx, self.pool.as_ptr(), self.pool.as_ptr()) };
    }
}

impl Drop for TeamPool {
    fn drop(&mut self) {
        // SAFETY: created by ggml_threadpool_new; no context uses it any more (see attach).
        unsafe { sys::ggml_threadpool_free(self.pool.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teams_take_consecutive_cpus_from_their_offset() {
        let all = [0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(cpus_for(&all, 2, 0), vec![0, 1]);
        assert_eq!(cpus_for(&all, 4, 4), vec![4, 5, 6, 7]);
        // Wrapping around, and more threads than CPUs.
        assert_eq!(cpus_for(&all, 4, 6), vec![0, 1, 6, 7]);
        assert_eq!(cpus_for(&[0, 1], 4, 3), vec![0, 1]);
        // Only the allowed CPUs, in order.
        assert_eq!(cpus_for(&[2, 5, 9], 2, 1), vec![5, 9]);
        assert!(cpus_for(&[], 2, 0).is_empty());
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}
