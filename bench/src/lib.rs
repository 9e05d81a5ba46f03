//! Helpers shared by the benchmark peers (`ringcast-floor`, `ringcast-tokio-peer`) and
//! the harness (`ringcast-bench`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The user id inside the `token` query parameter of a socket URL (the signature is not
/// checked: the peers only need the id to build the same broadcast bytes as ringcast).
/// Falls back to `"anonymous"` when there is no readable token.
///
/// ```
/// use ringcast_bench::user_from_query;
/// let token = ringcast::proto::token::sign(b"k", "lg7", 1);
/// assert_eq!(user_from_query(&format!("token={token}&vsn=2.0.0")), "lg7");
/// assert_eq!(user_from_query("vsn=2.0.0"), "anonymous");
/// ```
pub fn user_from_query(query: &str) -> String {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .and_then(|token| token.split('.').next())
        .and_then(|claims| URL_SAFE_NO_PAD.decode(claims).ok())
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|v| v.get("user_id")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "anonymous".to_string())
}

/// The CPUs this process may run on (its affinity mask, as `taskset` set it).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to one CPU; false when the kernel refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: as above; sched_setaffinity(0) acts on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The median of the finite values (the mean of the middle two for an even count), or
/// `None` when there are none.
///
/// ```
/// use ringcast_bench::median;
/// assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
/// assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
/// assert_eq!(median(vec![f64::NAN]), None);
/// ```
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}
