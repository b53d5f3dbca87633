"""Q3014 eligibility and the fee schedule, read from data (``q3014.toml`` + the site config).

Nothing here is a constant in code: site types, the fee per date of service, the waiver
periods of the geographic requirement and the per-payer-kind rules are rows of
``q3014.toml`` (each citing its source); a site adds or overrides per payer in
``[[claims.payer]]`` and its own charge in ``[claims]``. Every decision carries its reason
in words a biller can check, and is pure: the date of service is a parameter.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from importlib import resources
from typing import Any

from appliance.config import ClaimsConfig, PayerConfig, PayerKind, SiteConfig
from appliance.errors import ApplianceError
from services.claims.model import Form, to_cents

DATA_FILE = "q3014.toml"


class RulesError(ApplianceError):
    """The Q3014 data table is malformed (a packaging or editing mistake)."""


@dataclass(frozen=True, slots=True)
class FeeRow:
    """The fee for dates of service ``start``..``end`` (inclusive), with its source."""

    start: date
    end: date
    amount: Decimal
    source: str


@dataclass(frozen=True, slots=True)
class SiteTypeRule:
    """How one kind of originating site bills."""

    eligible: bool
    form: Form
    place_of_service: str | None
    type_of_bill: str | None
    revenue_code: str | None


@dataclass(frozen=True, slots=True)
class PayerKindRule:
    """Defaults for a kind of payer (a configured payer may override them)."""

    pays_q3014: bool | None
    geography_rule: bool
    timely_filing_days: int
    filing_indicator_837p: str
    filing_indicator_837i: str


@dataclass(frozen=True, slots=True)
class Rules:
    """The whole data table."""

    fees: tuple[FeeRow, ...]
    site_types: dict[str, SiteTypeRule]
    waivers: tuple[tuple[date, date, str], ...]
    payer_kinds: dict[str, PayerKindRule]
    medicaid_states: dict[str, bool]

    def fee_on(self, day: date) -> FeeRow | None:
        """The fee schedule row covering a date of service, if any."""
        return next((row for row in self.fees if row.start <= day <= row.end), None)

    def waiver_on(self, day: date) -> str | None:
        """The source of a geographic waiver covering ``day``, if one does."""
        return next((src for start, end, src in self.waivers if start <= day <= end), None)


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if not isinstance(value, kind):
        raise RulesError(f"{DATA_FILE}: {where}.{key}: expected {kind.__name__}")
    return value


def parse_rules(data: dict[str, Any]) -> Rules:
    """Build :class:`Rules` from the parsed TOML (raises :class:`RulesError`)."""
    fees = tuple(
        FeeRow(
            _get(row, "from", date, f"fee[{i}]"),
            _get(row, "to", date, f"fee[{i}]"),
            Decimal(_get(row, "amount", str, f"fee[{i}]")),
            _get(row, "source", str, f"fee[{i}]"),
        )
        for i, row in enumerate(data.get("fee", []))
    )
    site_types = {
        name: SiteTypeRule(
            bool(row.get("eligible", False)),
            Form(_get(row, "form", str, f"site_type.{name}")),
            row.get("place_of_service"),
            row.get("type_of_bill"),
            row.get("revenue_code"),
        )
        for name, row in data.get("site_type", {}).items()
    }
    waivers = tuple(
        (
            _get(row, "from", date, f"geographic_waiver[{i}]"),
            _get(row, "to", date, f"geographic_waiver[{i}]"),
            _get(row, "source", str, f"geographic_waiver[{i}]"),
        )
        for i, row in enumerate(data.get("geographic_waiver", []))
    )
    kinds = {
        name: PayerKindRule(
            row.get("pays_q3014"),
            bool(row.get("geography_rule", False)),
            int(row.get("timely_filing_days", 365)),
            _get(row, "filing_indicator_837p", str, f"payer_kind.{name}"),
            _get(row, "filing_indicator_837i", str, f"payer_kind.{name}"),
        )
        for name, row in data.get("payer_kind", {}).items()
    }
    states = {
        code: bool(_get(row, "pays_q3014", bool, f"medicaid_state.{code}"))
        for code, row in data.get("medicaid_state", {}).items()
    }
    for kind in PayerKind:
        if kind.value not in kinds:
            raise RulesError(f"{DATA_FILE}: payer_kind.{kind.value}: missing")
    return Rules(fees, site_types, waivers, kinds, states)


def load_rules() -> Rules:
    """The packaged data table."""
    text = (resources.files("services.claims") / DATA_FILE).read_text(encoding="utf-8")
    return parse_rules(tomllib.loads(text))


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a visit's Q3014 is billable to a payer, why, and at what amounts."""

    eligible: bool
    reason: str
    site_rule: SiteTypeRule | None = None
    fee_cents: int = 0
    charge_cents: int = 0
    filing_indicator: str = ""
    timely_filing_days: int = 365


def decide(
    rules: Rules,
    site: SiteConfig,
    claims: ClaimsConfig,
    payer: PayerConfig,
    service_date: date,
) -> Decision:
    """The eligibility of a Q3014 for a visit at this site on ``service_date`` billed to ``payer``."""
    if not claims.enabled:
        return Decision(False, "claims are not enabled for this site ([claims] enabled = false)")
    site_rule = rules.site_types.get(site.type.value)
    if site_rule is None or not site_rule.eligible:
        return Decision(False, f"site type {site.type.value} is not an originating site for Q3014")
    kind_rule = rules.payer_kinds[payer.kind.value]
    pays = payer.pays_q3014
    if pays is None and payer.kind is PayerKind.MEDICAID:
        state = payer.state or site.address.state
        pays = rules.medicaid_states.get(state)
        if pays is None:
            return Decision(
                False,
                f"Medicaid in {state}: no rule in the data table or the site config; declare the "
                "payer in [[claims.payer]] with pays_q3014 once the state plan is confirmed",
            )
    if pays is None:
        pays = kind_rule.pays_q3014
    if not pays:
        return Decision(False, f"payer {payer.name} ({payer.kind.value}) does not pay Q3014")
    geography = kind_rule.geography_rule if payer.geography_rule is None else payer.geography_rule
    where = "rural site"
    if geography and not site.rural:
        waiver = rules.waiver_on(service_date)
        if waiver is None:
            return Decision(
                False,
                f"site is not rural (site.rural = false) and no geographic waiver covers "
                f"{service_date.isoformat()}",
            )
        where = f"geographic requirement waived ({waiver})"
    elif not geography:
        where = "no geographic requirement for this payer"
    if payer.fee is not None:
        fee, fee_source = payer.fee, f"{payer.name}'s own fee"
    else:
        row = rules.fee_on(service_date)
        if row is None:
            return Decision(
                False, f"no Q3014 fee schedule row covers {service_date.isoformat()} (q3014.toml)"
            )
        fee, fee_source = row.amount, row.source
    charge = claims.charge if claims.charge is not None else fee
    indicator = payer.filing_indicator or (
        kind_rule.filing_indicator_837p
        if site_rule.form is Form.PROFESSIONAL
        else kind_rule.filing_indicator_837i
    )
    return Decision(
        True,
        f"{site.type.value} site, {payer.kind.value} payer {payer.name}; {where}; "
        f"fee ${fee} ({fee_source})",
        site_rule,
        to_cents(fee),
        to_cents(charge),
        indicator,
        payer.timely_filing_days or kind_rule.timely_filing_days,
    )
