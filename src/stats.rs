//! Statistics over runs: summaries, confidence intervals of the mean, the one-sided t-test
//! airbench reports, and Welch's t-test between two sets of runs. Student's t distribution
//! (and the sample mean and variance) are statrs's; this module only combines them.

use statrs::distribution::{ContinuousCDF, StudentsT};
use statrs::statistics::Statistics;

/// n, mean, sample standard deviation (n − 1 in the denominator; NaN for n < 2), min, max.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(xs: &[f64]) -> Summary {
    Summary { n: xs.len(), mean: Statistics::mean(xs), std: Statistics::std_dev(xs), min: Statistics::min(xs), max: Statistics::max(xs) }
}

/// The standard Student's t distribution with `df` degrees of freedom (df > 0).
fn student_t(df: f64) -> StudentsT {
    StudentsT::new(0.0, 1.0, df).expect("Student's t needs positive degrees of freedom")
}

/// The two-sided `level` confidence interval of the mean (`level` 0.95 for 95%):
/// mean ± t(1 − (1 − level)/2; n − 1)·s/√n. None with fewer than 2 samples.
pub fn mean_confidence_interval(xs: &[f64], level: f64) -> Option<(f64, f64)> {
    let s = summarize(xs);
    if s.n < 2 {
        return None;
    }
    let half = student_t((s.n - 1) as f64).inverse_cdf(0.5 + level / 2.0) * s.std / (s.n as f64).sqrt();
    Some((s.mean - half, s.mean + half))
}

/// p-value of a one-sided one-sample t-test of "the true mean is below `target`": small
/// values are evidence that the mean is at least `target`. None with fewer than 2 samples.
pub fn p_value_mean_below(xs: &[f64], target: f64) -> Option<f64> {
    let s = summarize(xs);
    if s.n < 2 {
        return None;
    }
    if s.std == 0.0 {
        return Some(if s.mean >= target { 0.0 } else { 1.0 });
    }
    let t = (s.mean - target) / (s.std / (s.n as f64).sqrt());
    Some(student_t((s.n - 1) as f64).sf(t))
}

/// Welch's t-test of mean(a) = mean(b) without assuming equal variances.
#[derive(Clone, Copy, Debug)]
pub struct Welch {
    /// mean(a) − mean(b).
    pub difference: f64,
    /// Its standard error, √(s²_a/n_a + s²_b/n_b).
    pub standard_error: f64,
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
    /// The `level` confidence interval of the difference.
    pub ci: (f64, f64),
}

/// Welch's t-test between `a` and `b`, with a `level` confidence interval of the difference of
/// means. None unless both have at least 2 samples.
pub fn welch(a: &[f64], b: &[f64], level: f64) -> Option<Welch> {
    let (sa, sb) = (summarize(a), summarize(b));
    if sa.n < 2 || sb.n < 2 {
        return None;
    }
    let (va, vb) = (sa.std * sa.std / sa.n as f64, sb.std * sb.std / sb.n as f64);
    let difference = sa.mean - sb.mean;
    let standard_error = (va + vb).sqrt();
    if standard_error == 0.0 {
        // Both constant: the difference is exact.
        let (t, p) = if difference == 0.0 { (0.0, 1.0) } else { (difference.signum() * f64::INFINITY, 0.0) };
        return Some(Welch { difference, standard_error, t, df: (sa.n + sb.n - 2) as f64, p, ci: (difference, difference) });
    }
    let df = (va + vb).powi(2) / (va * va / (sa.n - 1) as f64 + vb * vb / (sb.n - 1) as f64);
    let t = difference / standard_error;
    let dist = student_t(df);
    let p = (2.0 * dist.sf(t.abs())).min(1.0);
    let half = dist.inverse_cdf(0.5 + level / 2.0) * standard_error;
    Some(Welch { difference, standard_error, t, df, p, ci: (difference - half, difference + half) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, tol: f64) {
        assert!((got - want).abs() <= tol * want.abs().max(1.0), "got {got}, want {want}");
    }

    #[test]
    fn student_t_against_tables() {
        // Two-sided 95% critical values t(0.975; df) as printed in every t table (3 decimals)
        // and from scipy 1.17.1 `stats.t.ppf(0.975, df)` (an independent implementation).
        for (df, table, scipy) in [
            (1.0, 12.706, 12.706_204_736_174_694),
            (2.0, 4.303, 4.302_652_729_749_462),
            (4.0, 2.776, 2.776_445_105_197_793),
            (9.0, 2.262, 2.262_157_162_798_205),
            (19.0, 2.093, 2.093_024_054_408_309),
            (99.0, 1.984, 1.984_216_951_586_417),
        ] {
            let q = student_t(df).inverse_cdf(0.975);
            assert!((q - table).abs() < 5e-4, "df {df}: {q} against the table's {table}");
            close(q, scipy, 1e-9);
        }
        // scipy `stats.t.sf(2, 10)` and `stats.t.sf(1, 3)`; the distribution is symmetric.
        close(student_t(10.0).sf(2.0), 0.036_694_017_385_370_18, 1e-9);
        close(student_t(3.0).sf(1.0), 0.195_501_109_477_885_24, 1e-9);
        close(student_t(10.0).cdf(-2.0), 0.036_694_017_385_370_18, 1e-9);
        close(student_t(5.0).cdf(0.0), 0.5, 1e-12);
    }

    #[test]
    fn summary_interval_and_one_sided_test() {
        let xs = [0.941, 0.943, 0.939, 0.945, 0.942];
        let s = summarize(&xs);
        close(s.mean, 0.942, 1e-12);
        assert!(s.min == 0.939 && s.max == 0.945 && s.n == 5);
        close(s.std, 0.002_236_067_977_499_791_6, 1e-12); // numpy.std(xs, ddof=1)
                                                          // t = 0.002 / (0.002236 / √5) = 2.0 with 4 degrees of freedom. scipy 1.17.1:
                                                          // ttest_1samp(xs, 0.94, alternative='greater').pvalue = 0.05805826175840778.
        close(p_value_mean_below(&xs, 0.940).unwrap(), 0.058_058_261_758_407_78, 1e-9);
        // ttest_1samp(xs, 0.94).confidence_interval(0.95) = (0.9392235548948021, 0.9447764451051978).
        let (lo, hi) = mean_confidence_interval(&xs, 0.95).unwrap();
        close(lo, 0.939_223_554_894_802_1, 1e-12);
        close(hi, 0.944_776_445_105_197_8, 1e-12);
        assert!(p_value_mean_below(&xs[..1], 0.94).is_none() && mean_confidence_interval(&xs[..1], 0.95).is_none());
        assert!(summarize(&xs[..1]).std.is_nan());
        assert_eq!(p_value_mean_below(&[0.95, 0.95], 0.94), Some(0.0));
    }

    #[test]
    fn welch_against_published_examples() {
        // The two examples of Wikipedia's "Welch's t-test" article (t = −2.46, df 24.98, p =
        // 0.021; t = −1.57, df 9.90, p = 0.149), to the digits of scipy 1.17.1
        // `ttest_ind(a, b, equal_var=False)` and its `confidence_interval(0.95)`.
        let a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4];
        let a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4];
        let w = welch(&a1, &a2, 0.95).unwrap();
        close(w.difference, -2.166_666_666_666_668, 1e-12);
        close(w.t, -2.455_356_398_286_006, 1e-10);
        close(w.df, 24.988_529_290_231_416, 1e-10);
        close(w.p, 0.021_378_001_462_866_992, 1e-8);
        close(w.ci.0, -3.984_096_267_140_929, 1e-9);
        close(w.ci.1, -0.349_237_066_192_406_9, 1e-8);
        let b1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8];
        let b2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5, 21.5, 21.8];
        let w = welch(&b1, &b2, 0.95).unwrap();
        close(w.t, -1.565_433_523_598_503_7, 1e-10);
        close(w.df, 9.904_741_248_650_831, 1e-10);
        close(w.p, 0.148_841_696_605_328_17, 1e-8);
        close(w.ci.0, -3.698_421_325_375_163, 1e-9);
        close(w.ci.1, 0.648_421_325_375_165_8, 1e-9);
        // Swapping the samples flips the sign and keeps the p-value.
        let s = welch(&b2, &b1, 0.95).unwrap();
        close(s.t, 1.565_433_523_598_503_7, 1e-10);
        close(s.p, w.p, 1e-12);
        assert!(welch(&b1[..1], &b2, 0.95).is_none());
        let exact = welch(&[1.0, 1.0], &[2.0, 2.0], 0.95).unwrap();
        assert!(exact.p == 0.0 && exact.difference == -1.0);
    }
}
