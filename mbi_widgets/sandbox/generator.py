"""Deterministic history of a subscription business: the facts the sandbox renders as Stripe objects.

The generator simulates customers, their subscriptions through trials, renewals, failed payments
and churn, invoices, charges, refunds and the events that happened along the way. It produces
plain dataclasses with timelines; `render` turns them into Stripe JSON as of any moment, so an
event's `data.object` is the object as it was when the event happened.
"""
from __future__ import annotations

import bisect
import calendar
import random
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime

DAY = 86_400
HOUR = 3_600
#: How far back the generated history reaches from the sandbox clock.
HISTORY_DAYS = 730
#: Stripe keeps events listable for this long.
EVENT_WINDOW_DAYS = 30
SCALES = {"demo": 300, "bench": 7_000}

_ID_ALPHABET = string.ascii_letters + string.digits
_ID_TABLE = bytes(ord(_ID_ALPHABET[b % len(_ID_ALPHABET)]) for b in range(256))


def scale_to_customers(scale: str | int) -> int:
    """Number of customers for a scale name or an explicit count."""
    if isinstance(scale, int) or (isinstance(scale, str) and scale.isdigit()):
        count = int(scale)
        if count < 0:
            raise ValueError("scale must be 'demo', 'bench' or a number of customers >= 0")
        return count
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use 'demo', 'bench' or a number of customers")
    return SCALES[scale]


@dataclass(slots=True)
class Card:
    payment_method: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    fingerprint: str
    funding: str
    country: str


@dataclass(slots=True)
class Product:
    id: str
    name: str
    description: str
    created: int
    unit_label: str | None = None
    active: bool = True
    default_price: str | None = None
    deleted_at: int | None = None


@dataclass(slots=True)
class Plan:
    """A recurring price; Stripe serves the same object as a `plan` and as a `price`."""

    id: str
    product: Product
    amount: int
    interval: str
    nickname: str
    created: int
    currency: str
    trial_period_days: int | None = None
    active: bool = True
    lookup_key: str | None = None
    deleted_at: int | None = None


@dataclass(slots=True)
class AsPrice:
    """A plan seen through the Prices API (same id, `price` shape)."""

    plan: Plan


@dataclass(slots=True)
class Coupon:
    id: str
    name: str
    created: int
    duration: str
    currency: str
    percent_off: float | None = None
    amount_off: int | None = None
    duration_in_months: int | None = None
    max_redemptions: int | None = None
    redeem_by: int | None = None
    redemptions: list[int] = field(default_factory=list)
    deleted_at: int | None = None

    def times_redeemed(self, at: int) -> int:
        return bisect.bisect_right(self.redemptions, at)

    def discount_on(self, amount: int) -> int:
        if self.percent_off is not None:
            return round(amount * self.percent_off / 100)
        return min(amount, self.amount_off or 0)


@dataclass(slots=True)
class Customer:
    id: str
    name: str
    email: str
    phone: str | None
    created: int
    address: dict[str, str | None]
    card: Card
    invoice_prefix: str
    signup_source: str
    currency: str
    invoice_times: list[int] = field(default_factory=list)
    past_due_spans: list[tuple[int, int]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    #: (time, changed attributes) in time order: what the customer edited after signing up.
    changes: list[tuple[int, dict]] = field(default_factory=list)
    deleted_at: int | None = None

    def delinquent(self, at: int) -> bool:
        return any(start <= at < end for start, end in self.past_due_spans)

    def attrs(self, at: int) -> dict:
        """The editable attributes (name, email, phone, address, metadata) as they were at `at`."""
        current = {"name": self.name, "email": self.email, "phone": self.phone, "address": self.address,
                   "metadata": self.metadata}
        for when, changed in self.changes:
            if when > at:
                break
            current = {**current, **changed}
        return current


@dataclass(slots=True)
class SubscriptionItem:
    id: str
    plan: Plan
    quantity: int
    created: int


@dataclass(slots=True)
class Subscription:
    id: str
    customer: Customer
    created: int
    items: list[SubscriptionItem]
    trial_start: int | None
    trial_end: int | None
    coupon: Coupon | None
    discount_id: str | None
    #: (time, status) transitions, in time order.
    statuses: list[tuple[int, str]] = field(default_factory=list)
    #: (start, end) billing periods, in time order.
    periods: list[tuple[int, int]] = field(default_factory=list)
    invoices: list["Invoice"] = field(default_factory=list)
    canceled_at: int | None = None
    ended_at: int | None = None
    cancel_at: int | None = None
    cancellation_reason: str | None = None
    cancellation_feedback: str | None = None

    def status(self, at: int) -> str:
        current = self.statuses[0][1]
        for when, status in self.statuses:
            if when > at:
                break
            current = status
        return current

    def period(self, at: int) -> tuple[int, int]:
        current = self.periods[0]
        for period in self.periods:
            if period[0] > at:
                break
            current = period
        return current


@dataclass(slots=True)
class Refund:
    id: str
    charge: "Charge"
    amount: int
    created: int
    reason: str | None
    balance_transaction: str


@dataclass(slots=True)
class Charge:
    id: str
    customer: Customer
    created: int
    amount: int
    currency: str
    description: str
    succeeded: bool
    payment_intent: str
    balance_transaction: str | None
    receipt_number: str | None
    statement_descriptor: str
    invoice: "Invoice | None" = None
    failure_code: str | None = None
    decline_reason: str | None = None
    refunds: list[Refund] = field(default_factory=list)
    risk_score: int = 20

    def refunds_at(self, at: int) -> list[Refund]:
        return [refund for refund in self.refunds if refund.created <= at]


@dataclass(slots=True)
class InvoiceLine:
    id: str
    description: str
    amount: int
    discount: int
    quantity: int
    plan: Plan
    period: tuple[int, int]
    subscription_item: str


@dataclass(slots=True)
class Invoice:
    id: str
    number: str
    customer: Customer
    subscription: Subscription | None
    created: int
    period_start: int
    period_end: int
    billing_reason: str
    lines: list[InvoiceLine]
    currency: str
    finalized_at: int | None = None
    paid_at: int | None = None
    marked_uncollectible_at: int | None = None
    charges: list[Charge] = field(default_factory=list)

    @property
    def subtotal(self) -> int:
        return sum(line.amount for line in self.lines)

    @property
    def discount(self) -> int:
        return sum(line.discount for line in self.lines)

    @property
    def total(self) -> int:
        return self.subtotal - self.discount

    def status(self, at: int) -> str:
        if self.finalized_at is None or at < self.finalized_at:
            return "draft"
        if self.paid_at is not None and at >= self.paid_at:
            return "paid"
        if self.marked_uncollectible_at is not None and at >= self.marked_uncollectible_at:
            return "uncollectible"
        return "open"

    def attempts(self, at: int) -> list[Charge]:
        return [charge for charge in self.charges if charge.created <= at]


@dataclass(slots=True)
class Event:
    """Something that happened: rendered later as a Stripe event whose data.object is `subject` at `created`."""

    id: str
    created: int
    type: str
    subject: object
    previous_attributes: dict | None = None
    request_id: str | None = None


@dataclass(slots=True)
class AccountProfile:
    id: str
    business_name: str
    email: str
    country: str
    currency: str
    domain: str
    statement_descriptor: str
    created: int


@dataclass
class History:
    """Everything that happens in one Stripe account from its start up to `end`.

    `now` is the moment the sandbox starts at; the simulation runs on to `end` so that the
    sandbox clock can be advanced and the business goes on (`render` shows any moment).
    """

    account: AccountProfile
    now: int
    end: int = 0
    products: list[Product] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    coupons: list[Coupon] = field(default_factory=list)
    customers: list[Customer] = field(default_factory=list)
    subscriptions: list[Subscription] = field(default_factory=list)
    invoices: list[Invoice] = field(default_factory=list)
    charges: list[Charge] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def as_of(self, at: int) -> "History":
        """The objects that exist at `at` (created, not deleted) and the events that happened by then."""
        def live(objects: list) -> list:
            return [o for o in objects if o.created <= at and (getattr(o, "deleted_at", None) is None or o.deleted_at > at)]

        return History(self.account, at, self.end, live(self.products), live(self.plans), live(self.coupons),
                       live(self.customers), live(self.subscriptions), live(self.invoices), live(self.charges),
                       live(self.refunds), [e for e in self.events if e.created <= at])


# --- vocabulary for realistic data -------------------------------------------------------------

_FIRST = ("Ava", "Liam", "Noah", "Emma", "Mia", "Lucas", "Sofia", "Mateo", "Amara", "Kenji", "Priya",
          "Omar", "Chloe", "Hugo", "Zara", "Ines", "Jonas", "Leila", "Ravi", "Nora", "Felix", "Yara",
          "Elena", "Theo", "Maya", "Daniel", "Aisha", "Lena", "Tomas", "Hana")
_LAST = ("Garcia", "Nguyen", "Smith", "Müller", "Rossi", "Kowalski", "Tanaka", "Okafor", "Haddad",
         "Silva", "Johansson", "Patel", "Dubois", "Kim", "Novak", "O'Brien", "Fischer", "Moreau",
         "Costa", "Lindqvist", "Ivanova", "Mensah", "Park", "Schmidt", "Rahman", "Lopez")
_COMPANY_WORDS = ("Blue", "North", "Bright", "Maple", "Cedar", "Harbor", "Summit", "Pixel", "Atlas",
                  "Copper", "River", "Orbit", "Lumen", "Willow", "Granite", "Nova", "Falcon", "Juniper")
_COMPANY_KINDS = ("Labs", "Goods", "Studio", "Foods", "Works", "Health", "Logistics", "Media",
                  "Outfitters", "Analytics", "Bakery", "Fitness")
_CITIES = {
    "US": (("San Francisco", "CA", "941"), ("Austin", "TX", "787"), ("Chicago", "IL", "606"),
           ("New York", "NY", "100"), ("Seattle", "WA", "981"), ("Denver", "CO", "802")),
    "GB": (("London", None, "EC1"), ("Manchester", None, "M1"), ("Leeds", None, "LS1")),
    "DE": (("Berlin", None, "101"), ("Hamburg", None, "201"), ("München", None, "803")),
    "FR": (("Paris", None, "750"), ("Lyon", None, "690")),
    "CA": (("Toronto", "ON", "M5V"), ("Vancouver", "BC", "V6B")),
    "AU": (("Sydney", "NSW", "200"), ("Melbourne", "VIC", "300")),
}
_STREETS = ("Market St", "Main St", "High Street", "Oak Avenue", "King Street", "Harbour Road",
            "Lindenstraße", "Rue de Rivoli", "Queen St W", "George St")
_CARDS = (("visa", "credit", 0.55), ("mastercard", "credit", 0.3), ("amex", "credit", 0.1),
          ("visa", "debit", 0.05))
_DECLINES = (("card_declined", "generic_decline"), ("card_declined", "insufficient_funds"),
             ("expired_card", "expired_card"), ("card_declined", "do_not_honor"))
_SIGNUP_SOURCES = ("web", "web", "web", "sales", "partner", "webinar")
_CANCEL_FEEDBACK = ("too_expensive", "missing_features", "switched_service", "unused", "other",
                    "low_quality", "customer_service", None)
_ONE_OFF = (("Onboarding workshop", 15_000, 60_000), ("Data migration service", 25_000, 120_000),
            ("Custom report pack", 5_000, 30_000), ("Training seat", 9_900, 9_900))

#: Catalog: (product name, description, unit label, monthly price in minor units, yearly price).
_CATALOG = (
    ("Starter", "For small teams getting started", None, 1_900, 19_000),
    ("Growth", "Dashboards and alerts for growing teams", None, 4_900, 49_000),
    ("Scale", "Per-seat analytics for larger organisations", "seat", 1_500, 15_000),
    ("Enterprise", "Unlimited dashboards, SSO and audit logs", None, 49_900, 499_000),
)
_ADD_ONS = ("Priority support", "Data warehouse sync", "Extra workspace", "Connector: Shopify",
            "Connector: Salesforce", "Connector: HubSpot", "Connector: Zendesk", "Connector: Xero",
            "Connector: Google Ads", "Connector: Meta Ads", "Connector: Mailchimp",
            "Connector: NetSuite", "Connector: Intercom", "Connector: Jira")


class _Ids:
    """Stripe-looking ids drawn from the seeded generator, so a seed always gives the same ids."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def __call__(self, prefix: str, length: int = 24) -> str:
        # One random byte per character, mapped onto the 62 letters and digits (a table lookup in C).
        return prefix + self._rng.randbytes(length).translate(_ID_TABLE).decode("ascii")


def add_months(ts: int, months: int) -> int:
    """`ts` moved by whole calendar months, clamping the day like Stripe's billing anchors do."""
    moment = datetime.fromtimestamp(ts, UTC)
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def _interval_end(start: int, interval: str) -> int:
    return add_months(start, 12 if interval == "year" else 1)


class HistoryGenerator:
    """Simulates one account's business from `now - HISTORY_DAYS` up to `now`."""

    def __init__(self, profile: AccountProfile, *, seed: int, customers: int, now: int,
                 horizon_days: int = 0) -> None:
        self.rng = random.Random(seed)
        self.ids = _Ids(self.rng)
        self.end = now + max(0, horizon_days) * DAY
        self.history = History(account=profile, now=now, end=self.end)
        self.customer_count = customers
        self.now = now
        self.start = now - HISTORY_DAYS * DAY
        self.window_start = now - EVENT_WINDOW_DAYS * DAY
        self.currency = profile.currency
        self._invoice_counter = 0

    # --- events ---------------------------------------------------------------------------------

    def _event(self, created: int, type_: str, subject: object, previous: dict | None = None) -> None:
        # Only the last 30 days of events exist, as in Stripe; older ones are never materialised.
        if self.window_start <= created <= self.end:
            request = self.ids("req_", 14) if not type_.startswith(("invoice.", "charge.")) else None
            self.history.events.append(Event(self.ids("evt_"), created, type_, subject, previous, request))

    # --- catalog --------------------------------------------------------------------------------

    def build_catalog(self) -> None:
        rng, h = self.rng, self.history
        launch = self.start - 60 * DAY
        factor = 1 if self.currency == "usd" else 0.9
        self.base_plans: list[Plan] = []
        for name, description, unit, monthly, yearly in _CATALOG:
            product = Product(self.ids("prod_", 14), name, description, launch + rng.randrange(DAY), unit)
            h.products.append(product)
            for interval, amount in (("month", monthly), ("year", yearly)):
                plan = Plan(self.ids("price_"), product, int(amount * factor), interval,
                            f"{name} {'monthly' if interval == 'month' else 'yearly'}",
                            product.created + rng.randrange(HOUR), self.currency,
                            trial_period_days=14 if name in ("Starter", "Growth") else None,
                            lookup_key=f"{name.lower()}_{interval}ly")
                h.plans.append(plan)
                self.base_plans.append(plan)
            product.default_price = h.plans[-2].id
        legacy = Product(self.ids("prod_", 14), "Starter (legacy)", "Retired 2024 starter plan",
                         launch - 200 * DAY, None, active=False)
        h.products.append(legacy)
        h.plans.append(Plan(self.ids("price_"), legacy, int(1_500 * factor), "month", "Legacy starter",
                            legacy.created + 60, self.currency, active=False))
        legacy.default_price = h.plans[-1].id
        self.add_on_plans = []
        for index, name in enumerate(_ADD_ONS):
            created = launch + (index + 1) * 20 * DAY
            product = Product(self.ids("prod_", 14), name, f"{name} add-on", created, None)
            plan = Plan(self.ids("price_"), product, int((2_500 if index < 3 else 1_500) * factor),
                        "month", name, created + 30, self.currency)
            product.default_price = plan.id
            h.products.append(product)
            h.plans.append(plan)
            self.add_on_plans.append(plan)
        # A pricing change launched inside the event window, so plan/product events exist.
        launched = self.now - rng.randint(4, 12) * DAY
        product = Product(self.ids("prod_", 14), "Growth Plus", "Growth with AI summaries", launched, None)
        plan = Plan(self.ids("price_"), product, int(6_900 * factor), "month", "Growth Plus monthly",
                    launched + 120, self.currency, trial_period_days=14, lookup_key="growth_plus_monthly")
        product.default_price = plan.id
        h.products.append(product)
        h.plans.append(plan)
        self.base_plans.append(plan)
        self._event(product.created, "product.created", product)
        self._event(plan.created, "plan.created", plan)
        self._event(plan.created, "price.created", AsPrice(plan))
        # After the sandbox's start: the retired plan and product are deleted, and a beta is
        # launched, then withdrawn (plan.deleted, product.deleted).
        retired = h.plans[len(_CATALOG) * 2]
        self._delete(retired, self.now + 2 * DAY + rng.randrange(HOUR), "plan.deleted")
        self._delete(legacy, self.now + 2 * DAY + HOUR + rng.randrange(HOUR), "product.deleted")
        beta_at = self.now + rng.randint(8, 12) * DAY
        if beta_at <= self.end:
            product = Product(self.ids("prod_", 14), "Insights Beta", "Early access to AI insights", beta_at, None)
            plan = Plan(self.ids("price_"), product, int(2_900 * factor), "month", "Insights Beta monthly",
                        beta_at + 60, self.currency, lookup_key="insights_beta_monthly")
            product.default_price = plan.id
            h.products.append(product)
            h.plans.append(plan)
            self._event(product.created, "product.created", product)
            self._event(plan.created, "plan.created", plan)
            self._event(plan.created, "price.created", AsPrice(plan))
            withdrawn = beta_at + rng.randint(25, 35) * DAY
            self._delete(plan, withdrawn, "plan.deleted")
            self._delete(product, withdrawn + 60, "product.deleted")

    def _delete(self, subject: Plan | Product | Coupon | Customer, at: int, type_: str) -> None:
        """Deletes `subject` at `at` (if the simulation reaches it), with its `*.deleted` event."""
        if at <= self.end:
            subject.deleted_at = at
            self._event(at, type_, subject)

    def build_coupons(self) -> None:
        rng, h = self.rng, self.history
        specs = (
            ("WELCOME10", "Welcome: 10 off first invoice", None, 1_000, "once", None),
            ("LAUNCH25", "25% off for 3 months", 25.0, None, "repeating", 3),
            ("PARTNER15", "Partner discount 15%", 15.0, None, "forever", None),
            ("NONPROFIT50", "Non-profit 50% off", 50.0, None, "forever", None),
            ("ANNUAL20", "20% off first year", 20.0, None, "repeating", 12),
            ("SPRING5", "5 off for 2 months", None, 500, "repeating", 2),
        )
        for code, name, percent, amount, duration, months in specs:
            created = self.start - rng.randrange(30 * DAY)
            h.coupons.append(Coupon(code, name, created, duration, self.currency, percent, amount,
                                    months, max_redemptions=None))
        black_friday = self.now - rng.randint(2, 6) * DAY
        coupon = Coupon("BLACKFRIDAY30", "Black Friday 30% off", black_friday, "repeating",
                        self.currency, 30.0, None, 3, max_redemptions=500,
                        redeem_by=black_friday + 10 * DAY)
        h.coupons.append(coupon)
        self._event(coupon.created, "coupon.created", coupon)
        # After the start: an old coupon is retired, and short flash sales come and go.
        self._delete(h.coupons[5], self.now + 3 * DAY + rng.randrange(DAY), "coupon.deleted")
        at, number = self.now + rng.randint(1, 4) * DAY, 1
        while at <= self.end:
            flash = Coupon(f"FLASH{number:02d}", f"Flash sale {number}: 15% off", at, "once", self.currency,
                           15.0, None, None, max_redemptions=50)
            h.coupons.append(flash)
            self._event(flash.created, "coupon.created", flash)
            self._delete(flash, at + rng.randint(2, 8) * DAY, "coupon.deleted")
            at, number = at + rng.randint(4, 9) * DAY, number + 1

    # --- customers and their lives -------------------------------------------------------------

    def _card(self) -> Card:
        rng = self.rng
        brand, funding = rng.choices([(b, f) for b, f, _ in _CARDS], [w for *_, w in _CARDS])[0]
        return Card(self.ids("pm_"), brand, f"{rng.randrange(10_000):04d}", rng.randint(1, 12),
                    rng.randint(2027, 2031), self.ids("", 16), funding, self.history.account.country)

    def _customer(self, created: int) -> Customer:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        company = f"{rng.choice(_COMPANY_WORDS)} {rng.choice(_COMPANY_KINDS)}"
        domain = company.lower().replace(" ", "") + rng.choice((".com", ".io", ".co"))
        local = f"{first}.{last}".lower().replace("'", "").replace("ü", "u")
        country = rng.choices(list(_CITIES), (50, 12, 14, 8, 8, 8))[0]
        city, state, postal = rng.choice(_CITIES[country])
        address = {"city": city, "country": country,
                   "line1": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}", "line2": None,
                   "postal_code": f"{postal}{rng.randint(10, 99)}", "state": state}
        phone = f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}" if rng.random() < 0.6 else None
        source = rng.choice(_SIGNUP_SOURCES)
        customer = Customer(self.ids("cus_", 14), f"{first} {last}", f"{local}@{domain}", phone, created,
                            address, self._card(), "".join(rng.choices("0123456789ABCDEF", k=8)),
                            source, self.currency, metadata={"signup_source": source})
        self.history.customers.append(customer)
        self._event(created, "customer.created", customer)
        return customer

    def _charge(self, customer: Customer, created: int, amount: int, description: str,
                succeeded: bool, invoice: Invoice | None = None) -> Charge:
        rng = self.rng
        charge = Charge(self.ids("ch_"), customer, created, amount, self.currency, description, succeeded,
                        self.ids("pi_"), self.ids("txn_") if succeeded else None,
                        f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}" if succeeded else None,
                        self.history.account.statement_descriptor, invoice,
                        risk_score=rng.randint(5, 70))
        if not succeeded:
            charge.failure_code, charge.decline_reason = rng.choice(_DECLINES)
        self.history.charges.append(charge)
        self._event(created, "charge.succeeded" if succeeded else "charge.failed", charge)
        return charge

    def _refund(self, charge: Charge, created: int, amount: int, reason: str | None) -> None:
        refunded_before = sum(r.amount for r in charge.refunds)
        refund = Refund(self.ids("re_"), charge, amount, created, reason, self.ids("txn_"))
        charge.refunds.append(refund)
        self.history.refunds.append(refund)
        self._event(created, "refund.created", refund)
        self._event(created, "charge.refunded", charge, {"amount_refunded": refunded_before,
                                                           "refunded": False})

    def _maybe_refund(self, charge: Charge, *, many: bool = False) -> None:
        rng = self.rng
        if many:
            # A long tail of partial refunds: more than Stripe embeds, so `refunds.has_more` is set.
            step = charge.amount // 20
            for index in range(12):
                self._refund(charge, min(self.end, charge.created + (index + 1) * HOUR), step,
                             "requested_by_customer")
            return
        if not charge.succeeded or rng.random() > 0.05:
            return
        created = charge.created + rng.randint(HOUR, 20 * DAY)
        if created > self.end:
            return
        reason = rng.choice(("requested_by_customer", "requested_by_customer", "duplicate", "fraudulent", None))
        if rng.random() < 0.6:
            self._refund(charge, created, charge.amount, reason)
        else:
            self._refund(charge, created, charge.amount // 2, reason)

    def _invoice(self, sub: Subscription, start: int, end: int, reason: str, trial: bool) -> Invoice:
        customer = sub.customer
        self._invoice_counter += 1
        sequence = len(customer.invoice_times) + 1
        lines = []
        for item in sub.items:
            amount = 0 if trial else item.plan.amount * item.quantity
            discount = 0
            if sub.coupon is not None and not trial and self._coupon_applies(sub, start):
                discount = sub.coupon.discount_on(amount)
            label = "Trial period for " if trial else f"{item.quantity} × "
            lines.append(InvoiceLine(self.ids("il_"), f"{label}{item.plan.product.name} "
                                     f"(at {item.plan.amount / 100:.2f} / {item.plan.interval})",
                                     amount, discount, item.quantity, item.plan, (start, end), item.id))
        invoice = Invoice(self.ids("in_"), f"{customer.invoice_prefix}-{sequence:04d}", customer, sub,
                          start, start, end, reason, lines, self.currency)
        customer.invoice_times.append(start)
        sub.invoices.append(invoice)
        self.history.invoices.append(invoice)
        self._event(start, "invoice.created", invoice)
        # Renewal invoices stay drafts for an hour before Stripe finalises and charges them.
        invoice.finalized_at = start if reason == "subscription_create" else start + HOUR
        if invoice.finalized_at <= self.end:
            self._event(invoice.finalized_at, "invoice.finalized", invoice)
        return invoice

    def _coupon_applies(self, sub: Subscription, at: int) -> bool:
        coupon = sub.coupon
        if coupon is None:
            return False
        if coupon.duration == "forever":
            return True
        months = 1 if coupon.duration == "once" else coupon.duration_in_months or 1
        return at < add_months(sub.created, months)

    def _collect(self, sub: Subscription, invoice: Invoice) -> bool:
        """Charges an invoice, with retries after a decline. Returns False when it ends unpaid."""
        rng, customer = self.rng, sub.customer
        if invoice.total == 0:
            invoice.paid_at = invoice.finalized_at
            self._event(invoice.paid_at, "invoice.paid", invoice)
            return True
        attempt_at = invoice.finalized_at + 2
        failed_since = None
        for attempt in range(4):
            if attempt_at > self.end:
                break
            ok = rng.random() > (0.07 if attempt == 0 else 0.45)
            charge = self._charge(customer, attempt_at, invoice.total,
                                  f"Subscription {'creation' if invoice.billing_reason == 'subscription_create' else 'update'}"
                                  f" (invoice {invoice.number})", ok, invoice)
            invoice.charges.append(charge)
            if ok:
                invoice.paid_at = attempt_at + 1
                self._event(invoice.paid_at, "invoice.paid", invoice)
                self._event(invoice.paid_at, "invoice.payment_succeeded", invoice)
                if failed_since is not None:
                    customer.past_due_spans.append((failed_since, invoice.paid_at))
                    sub.statuses.append((invoice.paid_at, "active"))
                    self._event(invoice.paid_at, "customer.subscription.updated", sub,
                                {"status": "past_due"})
                self._maybe_refund(charge)
                return True
            self._event(attempt_at + 1, "invoice.payment_failed", invoice)
            if failed_since is None:
                failed_since = attempt_at
                previous = sub.status(attempt_at)
                sub.statuses.append((attempt_at + 1, "past_due"))
                self._event(attempt_at + 1, "customer.subscription.updated", sub, {"status": previous})
            attempt_at += rng.choice((3, 5, 7)) * DAY
        if failed_since is not None and attempt_at <= self.end:
            # Smart retries exhausted: Stripe cancels the subscription and marks the invoice uncollectible.
            customer.past_due_spans.append((failed_since, attempt_at))
            invoice.marked_uncollectible_at = attempt_at
            self._event(attempt_at, "invoice.marked_uncollectible", invoice)
            self._end(sub, attempt_at, attempt_at, "payment_failed", None)
            return False
        if failed_since is not None:
            customer.past_due_spans.append((failed_since, self.end + 1))
        return True

    def _end(self, sub: Subscription, canceled_at: int, ended_at: int, reason: str, feedback: str | None) -> None:
        sub.canceled_at, sub.ended_at = canceled_at, ended_at
        sub.cancellation_reason, sub.cancellation_feedback = reason, feedback
        if ended_at > canceled_at:
            sub.cancel_at = ended_at
            self._event(canceled_at, "customer.subscription.updated", sub,
                        {"cancel_at_period_end": False, "cancel_at": None, "canceled_at": None})
        if ended_at <= self.end:
            sub.statuses.append((ended_at, "canceled"))
            self._event(ended_at, "customer.subscription.deleted", sub)

    def _subscription(self, customer: Customer, start: int, *, many_items: bool = False) -> None:
        rng = self.rng
        plans = [p for p in self.base_plans if p.created <= start] or self.base_plans[:1]
        if many_items:  # add-ons are monthly, and a subscription's items share one interval
            plans = [p for p in plans if p.interval == "month"]
        weights = [6 if p.interval == "month" else 2 for p in plans]
        plan = rng.choices(plans, weights)[0]
        quantity = rng.randint(2, 25) if plan.product.unit_label == "seat" else 1
        items = [SubscriptionItem(self.ids("si_", 14), plan, quantity, start)]
        add_ons = self.add_on_plans if many_items else (
            rng.sample(self.add_on_plans[:6], rng.randint(1, 3)) if rng.random() < 0.12 else [])
        items += [SubscriptionItem(self.ids("si_", 14), a, 1, start) for a in add_ons
                  if a.interval == plan.interval or plan.interval == "month"]
        trial = plan.trial_period_days is not None and rng.random() < 0.45
        usable = [c for c in self.history.coupons if c.created <= start and (c.redeem_by is None or start <= c.redeem_by)
                  and (c.deleted_at is None or start < c.deleted_at)]
        coupon = rng.choice(usable) if usable and rng.random() < 0.2 else None
        sub = Subscription(self.ids("sub_"), customer, start, items,
                           start if trial else None,
                           start + plan.trial_period_days * DAY if trial else None,
                           coupon, self.ids("di_") if coupon else None)
        if coupon is not None:
            coupon.redemptions.append(start)
        self.history.subscriptions.append(sub)
        sub.statuses.append((start, "trialing" if trial else "active"))
        self._event(start, "customer.subscription.created", sub)
        if trial:
            sub.periods.append((start, sub.trial_end))
            invoice = self._invoice(sub, start, sub.trial_end, "subscription_create", trial=True)
            self._collect(sub, invoice)
            abandoned_at = start + rng.randint(1, 13) * DAY
            if rng.random() < 0.3 and abandoned_at <= self.end:  # trial abandoned
                self._end(sub, abandoned_at, sub.trial_end, "cancellation_requested",
                          rng.choice(_CANCEL_FEEDBACK))
                return
            if sub.trial_end > self.end:
                return
            sub.statuses.append((sub.trial_end, "active"))
            self._event(sub.trial_end, "customer.subscription.updated", sub,
                        {"status": "trialing"})
            period_start = sub.trial_end
        else:
            period_start = start
        churn = 0.035 if plan.interval == "month" else 0.18
        first = not trial
        while period_start <= self.end:
            period_end = _interval_end(period_start, plan.interval)
            sub.periods.append((period_start, period_end))
            invoice = self._invoice(sub, period_start, period_end,
                                    "subscription_create" if first else "subscription_cycle", trial=False)
            first = False
            if not self._collect(sub, invoice):
                return
            if rng.random() < churn:
                # Canceled once the period's invoice is settled (a retry may have paid it days later).
                settled = invoice.paid_at or period_start
                canceled_at = settled + rng.randint(HOUR, max(HOUR + 1, period_end - settled - HOUR))
                if canceled_at > self.end:
                    return
                at_period_end = rng.random() < 0.6
                self._end(sub, canceled_at, period_end if at_period_end else canceled_at,
                          "cancellation_requested", rng.choice(_CANCEL_FEEDBACK))
                return
            period_start = period_end

    def build_customers(self) -> None:
        rng = self.rng
        span = self.now - self.start
        # Growth: more sign-ups recently than two years ago.
        offsets = sorted(int(span * (rng.random() ** 0.7)) for _ in range(self.customer_count))
        # After the start, sign-ups go on at the latest rate (the growth curve's slope at the start).
        rate = self.customer_count / span / 0.7 if span else 0
        future = sorted(rng.randrange(1, self.end - self.now + 1) for _ in range(round(rate * (self.end - self.now))))
        created_times = [self.start + offset for offset in offsets] + [self.now + offset for offset in future]
        for index, created in enumerate(created_times):
            first_charge, first_sub = len(self.history.charges), len(self.history.subscriptions)
            customer = self._customer(created)
            many_items = index == 7 or (index >= self.customer_count and rng.random() < 0.003)
            if many_items or rng.random() < 0.85:
                start = min(self.end, created + rng.randint(60, 2 * DAY))
                self._subscription(customer, start, many_items=many_items)
            one_offs = 1 if index == 11 else (rng.randint(1, 2) if rng.random() < 0.25 else 0)
            for _ in range(one_offs):
                at = created + rng.randint(HOUR, max(HOUR + 1, self.end - created))
                if at > self.end:
                    continue
                description, low, high = rng.choice(_ONE_OFF)
                ok = index == 11 or rng.random() > 0.08
                charge = self._charge(customer, at, rng.randint(low // 100, high // 100) * 100,
                                      description, ok)
                if ok:
                    self._maybe_refund(charge, many=index == 11)
            self._customer_afterlife(customer, self.history.subscriptions[first_sub:],
                                     self.history.charges[first_charge:])

    def _customer_afterlife(self, customer: Customer, subs: list[Subscription], charges: list[Charge]) -> None:
        """Edits of the customer's details, and for some who left, the deletion of the customer."""
        rng = self.rng
        deleted_at = None
        if all(s.ended_at is not None for s in subs) and rng.random() < 0.25:
            last = max([customer.created, *(s.ended_at for s in subs),
                        *(inv.paid_at or inv.marked_uncollectible_at or inv.created for s in subs for inv in s.invoices),
                        *(c.created for c in charges), *(r.created for c in charges for r in c.refunds)])
            deleted_at = last + rng.randint(1, 60) * DAY
        edits = rng.choices((0, 1, 2), (0.65, 0.25, 0.1))[0]
        first, last_edit = customer.created + DAY, min(self.end, deleted_at or self.end)
        for when in sorted(rng.randint(first, max(first, last_edit)) for _ in range(edits)):
            if when >= last_edit:
                continue
            before = customer.attrs(when)
            kind = rng.choice(("email", "address", "metadata", "phone"))
            if kind == "email":
                local, _, domain = before["email"].partition("@")
                changed = {"email": f"{local}+billing@{domain}" if "+" not in local else f"{local.split('+')[0]}@{domain}"}
            elif kind == "address":
                country = before["address"]["country"]
                city, state, postal = rng.choice(_CITIES[country])
                changed = {"address": {"city": city, "country": country,
                                       "line1": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}", "line2": None,
                                       "postal_code": f"{postal}{rng.randint(10, 99)}", "state": state}}
            elif kind == "metadata":
                changed = {"metadata": {**before["metadata"],
                                        "segment": rng.choice(("smb", "mid_market", "enterprise", "nonprofit"))}}
            else:
                changed = {"phone": f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"}
            customer.changes.append((when, changed))
            self._event(when, "customer.updated", customer, {k: before[k] for k in changed})
        if deleted_at is not None:
            self._delete(customer, deleted_at, "customer.deleted")

    def generate(self) -> History:
        if self.customer_count == 0:  # an account with no business yet (the platform): nothing at all
            return self.history
        self.build_catalog()
        self.build_coupons()
        self.build_customers()
        for coupon in self.history.coupons:
            coupon.redemptions.sort()
        for sub in self.history.subscriptions:
            sub.statuses.sort(key=lambda change: change[0])  # status() reads them in time order
        from mbi_widgets.sandbox.render import complete_events  # render imports this module
        complete_events(self.history, self.ids, self.window_start)
        self.history.events.sort(key=lambda e: e.created)
        return self.history


def generate_history(profile: AccountProfile, *, seed: int, customers: int, now: int,
                     horizon_days: int = 0) -> History:
    """The account's simulated history from two years before `now` to `horizon_days` after it.

    The same arguments always give the same history.
    """
    return HistoryGenerator(profile, seed=seed, customers=customers, now=now, horizon_days=horizon_days).generate()
