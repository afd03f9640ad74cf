//! Exact money: non-negative amounts with 18 fractional digits, held as an integer number
//! of 10^-18 units (`u128`). Parsing follows the CRD pattern; arithmetic is checked (an
//! overflow is an error, never a wrap); rewards round down, so a contributor is never paid
//! more than the exact product. No floating point anywhere.

use std::fmt;
use std::str::FromStr;

const SCALE: u128 = 1_000_000_000_000_000_000;

/// An exact non-negative decimal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(u128);

/// Why a decimal is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// Not of the form `digits[.digits]` with at most 18 fractional digits.
    #[error("{0:?} is not an exact decimal (digits, optionally a point and up to 18 digits)")]
    Syntax(String),
    /// Too large to represent.
    #[error("decimal overflow")]
    Overflow,
}

impl Amount {
    /// Zero.
    pub const ZERO: Amount = Amount(0);

    /// From 10^-18 units.
    pub fn from_atto(atto: u128) -> Amount {
        Amount(atto)
    }

    /// In 10^-18 units.
    pub fn atto(self) -> u128 {
        self.0
    }

    /// `self + other`, or an overflow error.
    pub fn checked_add(self, other: Amount) -> Result<Amount, DecimalError> {
        self.0
            .checked_add(other.0)
            .map(Amount)
            .ok_or(DecimalError::Overflow)
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }

    /// `self * numerator / denominator`, rounded down (the rate-times-usage rule).
    pub fn mul_div(self, numerator: u64, denominator: u64) -> Result<Amount, DecimalError> {
        if denominator == 0 {
            return Err(DecimalError::Overflow);
        }
        let product = self
            .0
            .checked_mul(numerator as u128)
            .ok_or(DecimalError::Overflow)?;
        Ok(Amount(product / denominator as u128))
    }
}

impl FromStr for Amount {
    type Err = DecimalError;

    fn from_str(s: &str) -> Result<Amount, DecimalError> {
        let err = || DecimalError::Syntax(s.to_string());
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) if !f.is_empty() => (i, f),
            Some(_) => return Err(err()),
            None => (s, ""),
        };
        if int.is_empty()
            || frac.len() > 18
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let int: u128 = int.parse().map_err(|_| DecimalError::Overflow)?;
        let mut frac_units: u128 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_units += (b - b'0') as u128 * 10u128.pow(17 - i as u32);
        }
        int.checked_mul(SCALE)
            .and_then(|v| v.checked_add(frac_units))
            .map(Amount)
            .ok_or(DecimalError::Overflow)
    }
}

impl fmt::Display for Amount {
    /// Canonical form: no trailing fractional zeros, no point for whole numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = (self.0 / SCALE, self.0 % SCALE);
        if frac == 0 {
            write!(f, "{int}")
        } else {
            let digits = format!("{frac:018}");
            write!(f, "{int}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_canonically() {
        let a: Amount = "0.000125".parse().expect("decimal");
        assert_eq!(a.atto(), 125_000_000_000_000);
        assert_eq!(a.to_string(), "0.000125");
        assert_eq!("5.00".parse::<Amount>().expect("decimal").to_string(), "5");
        assert_eq!(
            "0.000000000000000001"
                .parse::<Amount>()
                .expect("decimal")
                .atto(),
            1
        );
        for bad in [
            "",
            ".5",
            "5.",
            "1e3",
            "-1",
            "1.0000000000000000001",
            "1,5",
            " 1",
        ] {
            assert!(bad.parse::<Amount>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rewards_round_down_never_up() {
        // 0.000000000000000003 per second for 1.5 s is 0.0000000000000000045: paid ...004.
        let rate: Amount = "0.000000000000000003".parse().expect("rate");
        assert_eq!(rate.mul_div(1500, 1000).expect("product").atto(), 4);
        assert!(
            Amount::from_atto(u128::MAX)
                .checked_add(Amount::from_atto(1))
                .is_err()
        );
        assert!(Amount::from_atto(u128::MAX).mul_div(2, 1).is_err());
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(atto in any::<u128>()) {
            let a = Amount::from_atto(atto);
            prop_assert_eq!(a.to_string().parse::<Amount>(), Ok(a));
        }

        #[test]
        fn addition_is_exact_and_order_free(xs in prop::collection::vec(0u64..u64::MAX, 0..50)) {
            let forward = xs.iter().try_fold(Amount::ZERO, |acc, x| acc.checked_add(Amount::from_atto(*x as u128)));
            let backward = xs.iter().rev().try_fold(Amount::ZERO, |acc, x| acc.checked_add(Amount::from_atto(*x as u128)));
            prop_assert_eq!(forward.clone(), backward);
            prop_assert_eq!(forward.map(|a| a.atto()), Ok(xs.iter().map(|x| *x as u128).sum::<u128>()));
        }

        #[test]
        fn mul_div_never_exceeds_the_exact_product(rate in 0u128..(1u128 << 80), millis in 0u64..(1u64 << 40)) {
            let paid = Amount::from_atto(rate).mul_div(millis, 1000).expect("fits");
            // paid * 1000 <= rate * millis < (paid + 1) * 1000
            let exact = rate * millis as u128;
            prop_assert!(paid.atto() * 1000 <= exact && exact < (paid.atto() + 1) * 1000);
        }
    }
}
