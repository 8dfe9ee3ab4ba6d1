//! CPU time of this process, for the load generators' per-command figures.

/// User plus system CPU time of this whole process so far (the load
/// generator, the library and its store runtime; not the database's), from
/// `getrusage`: divided by the commands, the CPU each command costs here.
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds(libc::RUSAGE_SELF)
}

/// The same for the calling thread alone: run on the load generator's
/// thread, what the generator itself spends, to be told apart from the rest.
#[allow(dead_code)] // not every load generator splits its figure
pub fn thread_cpu_seconds() -> f64 {
    cpu_seconds(libc::RUSAGE_THREAD)
}

/// Context switches of this whole process so far, voluntary (a thread
/// parked for want of work) and not: each hand-off to a parked thread costs
/// one, and on a small VM a switch costs more CPU than most steps of a command.
#[allow(dead_code)] // not every load generator reports it
pub fn process_context_switches() -> u64 {
    let usage = rusage(libc::RUSAGE_SELF);
    (usage.ru_nvcsw + usage.ru_nivcsw) as u64
}

fn rusage(who: libc::c_int) -> libc::rusage {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF and
    // RUSAGE_THREAD are always valid.
    unsafe {
        libc::getrusage(who, usage.as_mut_ptr());
        usage.assume_init()
    }
}

fn cpu_seconds(who: libc::c_int) -> f64 {
    let usage = rusage(who);
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
