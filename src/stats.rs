//! Summary statistics over runs, and the one-sided t-test airbench reports.

pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(xs: &[f64]) -> Summary {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = if n > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    let min = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Summary { n, mean, std: var.sqrt(), min, max }
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
    Some(1.0 - student_t_cdf(t, (s.n - 1) as f64))
}

/// CDF of Student's t distribution with `nu` degrees of freedom.
pub fn student_t_cdf(t: f64, nu: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(nu / 2.0, 0.5, nu / (nu + t * t));
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9), accurate to ~1e-15 for x > 0.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Regularised incomplete beta function I_x(a, b), by Lentz's continued fraction.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(b, a, 1.0 - x);
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp() / a;
    let tiny = 1e-300;
    let (mut f, mut c, mut d) = (1.0, 1.0, 0.0);
    for i in 0..400 {
        let m = (i / 2) as f64;
        let numerator = if i == 0 {
            1.0
        } else if i % 2 == 0 {
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))
        } else {
            -((a + m) * (a + b + m) * x) / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))
        };
        d = 1.0 + numerator * d;
        d = if d.abs() < tiny { tiny } else { d };
        d = 1.0 / d;
        c = 1.0 + numerator / c;
        c = if c.abs() < tiny { tiny } else { c };
        f *= c * d;
        if (1.0 - c * d).abs() < 1e-15 {
            break;
        }
    }
    front * (f - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_distribution_matches_tables() {
        // scipy.stats.t.sf(2.0, 10) = 0.036694017385, t.sf(1.0, 3) = 0.19550110947788.
        assert!((1.0 - student_t_cdf(2.0, 10.0) - 0.036_694_017_385).abs() < 1e-9);
        assert!((1.0 - student_t_cdf(1.0, 3.0) - 0.195_501_109_477_88).abs() < 1e-9);
        assert!((student_t_cdf(0.0, 5.0) - 0.5).abs() < 1e-12);
        assert!((student_t_cdf(-2.0, 10.0) - 0.036_694_017_385).abs() < 1e-9);
    }

    #[test]
    fn summary_and_p_value() {
        let xs = [0.941, 0.943, 0.939, 0.945, 0.942];
        let s = summarize(&xs);
        assert!((s.mean - 0.942).abs() < 1e-12 && s.min == 0.939 && s.max == 0.945);
        assert!((s.std - 0.002_236_067_977).abs() < 1e-9);
        // t = 0.002 / (0.002236 / √5) = 2.0, 4 degrees of freedom: sf = 0.05805826175.
        assert!((p_value_mean_below(&xs, 0.940).unwrap() - 0.058_058_261_75).abs() < 1e-8);
        assert!(p_value_mean_below(&xs[..1], 0.94).is_none());
    }
}
