//! Where a stage's decode threads run.
//!
//! llama.cpp runs a decode's threads as an OpenMP team that meets at a barrier after every
//! operation, so the team is only as fast as its slowest thread. Left to the kernel, a team's
//! threads can end up on one core while another core idles: a stage's threads sleep between
//! steps (its neighbours are working), and when they wake the kernel may put the woken worker
//! next to the thread that woke it. Kernels that pack virtual CPUs do this on purpose
//! (`sched_vcpu_pack` on the VMs we measure on): there two threads of a 4-stage pipeline shared
//! one vCPU for 8 ms at a time while the other halted, and one token in ten took 15–50 ms
//! instead of 8. Pinning thread `j` of a team to its own core, as llama.cpp's `--cpu-strict`
//! does, removes that. ggml applies the pinning itself at every graph compute when a context
//! has a thread pool whose workers carry CPU masks (the OpenMP build included), so a stage
//! attaches one ([`Pinning::attach`]).

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

/// A ggml thread pool whose thread `j` is pinned to the `j`-th of its CPUs. Under OpenMP it
/// holds no threads of its own, only the per-thread masks ggml applies at each compute.
pub struct Pinning {
    pool: NonNull<sys::ggml_threadpool>,
    threads: i32,
}

// SAFETY: the pool is only read by ggml during a compute of the context it is attached to,
// which runs on the thread that owns the Stage.
unsafe impl Send for Pinning {}

impl Pinning {
    /// A pool of `cpus.len()` threads, thread `j` on `cpus[j]` (`cpus` increasing).
    pub fn new(cpus: &[usize]) -> Result<Pinning, LlmError> {
        let threads = cpus.len() as i32;
        // SAFETY: plain FFI; the params are initialised by ggml before we set fields.
        unsafe {
            let mut params = sys::ggml_threadpool_params_default(threads);
            let slots = params.cpumask.len();
            if cpus.is_empty() || cpus.iter().any(|&c| c >= slots) {
                return Err(LlmError::Decode(format!(
                    "cannot pin threads to CPUs {cpus:?}"
                )));
            }
            params.cpumask = [false; _];
            for &cpu in cpus {
                params.cpumask[cpu] = true;
            }
            params.strict_cpu = true;
            let pool = NonNull::new(sys::ggml_threadpool_new(&mut params))
                .ok_or_else(|| LlmError::Decode("ggml_threadpool_new failed".into()))?;
            Ok(Pinning { pool, threads })
        }
    }

    /// Threads the pool has masks for: a decode may use at most this many.
    pub fn threads(&self) -> i32 {
        self.threads
    }

    /// Make `ctx`'s decodes run on this pool's CPUs. The pool must outlive the context.
    ///
    /// # Safety
    /// `ctx` is a valid context, freed before this `Pinning` is dropped.
    pub(crate) unsafe fn attach(&self, ctx: *mut sys::llama_context) {
        // SAFETY: per the contract above.
        unsafe { sys::llama_attach_threadpool(ctx, self.pool.as_ptr(), self.pool.as_ptr()) };
    }

    /// Called before a decode on `threads` threads, on the decoding thread.
    pub(crate) fn before_decode(&self, threads: i32) {
        if threads <= 1 {
            unpin_current_thread(allowed_cpus());
        }
    }
}

impl Drop for Pinning {
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
