//! Runtime dispatch to an AVX2 build of a pixel loop, so one binary is fast on current CPUs and
//! still runs on older x86-64 ones (and elsewhere).

/// Calls `body(args)` (an `#[inline(always)]` function) compiled with AVX2 enabled when the CPU
/// has it, else the portable build.
macro_rules! dispatch {
    ($body:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                fn with_avx2<R>(run: impl FnOnce() -> R) -> R {
                    run()
                }
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { with_avx2(|| $body($($arg),*)) };
            }
        }
        $body($($arg),*)
    }};
}

pub(crate) use dispatch;
