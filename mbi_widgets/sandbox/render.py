"""Stripe JSON for the generated facts, as each object looked at a given moment.

Shapes follow the Stripe API version pinned by stripe-python (`API_VERSION`): every top-level
field of the resource is present, with null where the sandbox has nothing to say.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stripe import api_version as API_VERSION

from mbi_widgets.sandbox.generator import (
    AccountProfile,
    AsPrice,
    Charge,
    Coupon,
    Customer,
    Event,
    Invoice,
    InvoiceLine,
    Plan,
    Product,
    Refund,
    Subscription,
    SubscriptionItem,
)

if TYPE_CHECKING:
    from mbi_widgets.sandbox.generator import History

#: Stripe embeds at most this many entries of a sub-list (invoice lines, items, refunds).
EMBED_LIMIT = 10

_NULL_ADDRESS = {"city": None, "country": None, "line1": None, "line2": None,
                 "postal_code": None, "state": None}


def list_object(url: str, data: list[dict], has_more: bool = False) -> dict:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def embedded_list(url: str, data: list[dict]) -> dict:
    return list_object(url, data[:EMBED_LIMIT], len(data) > EMBED_LIMIT)


def account(profile: AccountProfile) -> dict:
    return {
        "id": profile.id, "object": "account",
        "business_profile": {"annual_revenue": None, "estimated_worker_count": None, "mcc": "5734",
                             "name": profile.business_name, "product_description": None,
                             "support_address": None, "support_email": profile.email,
                             "support_phone": None, "support_url": None,
                             "url": f"https://{profile.domain}"},
        "business_type": "company",
        "capabilities": {"card_payments": "active", "transfers": "active"},
        "charges_enabled": True, "controller": {"type": "account"}, "country": profile.country,
        "created": profile.created, "default_currency": profile.currency, "details_submitted": True,
        "email": profile.email,
        "external_accounts": list_object(f"/v1/accounts/{profile.id}/external_accounts", []),
        "future_requirements": _no_requirements(), "metadata": {}, "payouts_enabled": True,
        "requirements": _no_requirements(),
        "settings": {"branding": {"icon": None, "logo": None, "primary_color": None, "secondary_color": None},
                     "card_payments": {"decline_on": {"avs_failure": False, "cvc_failure": False},
                                       "statement_descriptor_prefix": None,
                                       "statement_descriptor_prefix_kana": None,
                                       "statement_descriptor_prefix_kanji": None},
                     "dashboard": {"display_name": profile.business_name, "timezone": "Etc/UTC"},
                     "invoices": {"default_account_tax_ids": None, "hosted_payment_method_save": "offer"},
                     "payments": {"statement_descriptor": profile.statement_descriptor,
                                  "statement_descriptor_kana": None, "statement_descriptor_kanji": None},
                     "payouts": {"debit_negative_balances": True,
                                 "schedule": {"delay_days": 2, "interval": "daily"},
                                 "statement_descriptor": None}},
        "tos_acceptance": {"date": profile.created, "ip": None, "user_agent": None},
        "type": "standard",
    }


def _no_requirements() -> dict:
    return {"alternatives": [], "current_deadline": None, "currently_due": [], "disabled_reason": None,
            "errors": [], "eventually_due": [], "past_due": [], "pending_verification": []}


def product(p: Product, at: int) -> dict:
    del at
    return {
        "id": p.id, "object": "product", "active": p.active, "created": p.created,
        "default_price": p.default_price, "description": p.description, "images": [],
        "livemode": False, "marketing_features": [], "metadata": {}, "name": p.name,
        "package_dimensions": None, "shippable": None, "statement_descriptor": None,
        "tax_code": None, "type": "service", "unit_label": p.unit_label, "updated": p.created,
        "url": None,
    }


def plan(p: Plan, at: int = 0) -> dict:
    del at
    return {
        "id": p.id, "object": "plan", "active": p.active, "amount": p.amount,
        "amount_decimal": str(p.amount), "billing_scheme": "per_unit", "created": p.created,
        "currency": p.currency, "interval": p.interval, "interval_count": 1, "livemode": False,
        "metadata": {}, "meter": None, "nickname": p.nickname, "product": p.product.id,
        "tiers_mode": None, "transform_usage": None, "trial_period_days": p.trial_period_days,
        "usage_type": "licensed",
    }


def price(p: Plan, at: int = 0) -> dict:
    del at
    return {
        "id": p.id, "object": "price", "active": p.active, "billing_scheme": "per_unit",
        "created": p.created, "currency": p.currency, "custom_unit_amount": None,
        "livemode": False, "lookup_key": p.lookup_key, "metadata": {}, "nickname": p.nickname,
        "product": p.product.id,
        "recurring": {"interval": p.interval, "interval_count": 1, "meter": None,
                      "trial_period_days": p.trial_period_days, "usage_type": "licensed"},
        "tax_behavior": "unspecified", "tiers_mode": None, "transform_quantity": None,
        "type": "recurring", "unit_amount": p.amount, "unit_amount_decimal": str(p.amount),
    }


def coupon(c: Coupon, at: int) -> dict:
    redeemed = c.times_redeemed(at)
    valid = (c.redeem_by is None or at <= c.redeem_by) and (
        c.max_redemptions is None or redeemed < c.max_redemptions)
    return {
        "id": c.id, "object": "coupon", "amount_off": c.amount_off, "created": c.created,
        "currency": c.currency if c.amount_off is not None else None, "duration": c.duration,
        "duration_in_months": c.duration_in_months, "livemode": False,
        "max_redemptions": c.max_redemptions, "metadata": {}, "name": c.name,
        "percent_off": c.percent_off, "redeem_by": c.redeem_by, "times_redeemed": redeemed,
        "valid": valid,
    }


def customer(c: Customer, at: int) -> dict:
    invoices = sum(1 for t in c.invoice_times if t <= at)
    attrs = c.attrs(at)
    return {
        "id": c.id, "object": "customer", "address": dict(attrs["address"]), "balance": 0,
        "created": c.created, "currency": c.currency if invoices else None, "default_source": None,
        "delinquent": c.delinquent(at), "description": None, "discount": None, "email": attrs["email"],
        "invoice_prefix": c.invoice_prefix,
        "invoice_settings": {"custom_fields": None, "default_payment_method": c.card.payment_method,
                             "footer": None, "rendering_options": None},
        "livemode": False, "metadata": dict(attrs["metadata"]), "name": attrs["name"],
        "next_invoice_sequence": invoices + 1, "phone": attrs["phone"], "preferred_locales": ["en"],
        "shipping": None, "tax_exempt": "none", "test_clock": None,
    }


def deleted(subject: Customer) -> dict:
    """What retrieving a deleted customer answers (coupons, plans and products answer 404)."""
    return {"id": subject.id, "object": "customer", "deleted": True}


def refund(r: Refund, at: int = 0) -> dict:
    del at
    charge_ = r.charge
    return {
        "id": r.id, "object": "refund", "amount": r.amount,
        "balance_transaction": r.balance_transaction, "charge": charge_.id, "created": r.created,
        "currency": charge_.currency, "customer": charge_.customer.id, "customer_account": None,
        "destination_details": {"card": {"reference": r.id[3:15].upper(),
                                         "reference_status": "available",
                                         "reference_type": "acquirer_reference_number",
                                         "type": "refund"},
                                "type": "card"},
        "metadata": {}, "payment_intent": charge_.payment_intent,
        "payment_method": charge_.customer.card.payment_method, "reason": r.reason,
        "receipt_number": None, "source_transfer_reversal": None, "status": "succeeded",
        "transfer_reversal": None,
    }


def _outcome(ch: Charge) -> dict:
    if ch.succeeded:
        risk = "elevated" if ch.risk_score > 65 else "normal"
        return {"advice_code": None, "network_advice_code": None, "network_decline_code": None,
                "network_status": "approved_by_network", "reason": None, "risk_level": risk,
                "risk_score": ch.risk_score, "seller_message": "Payment complete.",
                "type": "authorized"}
    return {"advice_code": "try_again_later", "network_advice_code": None,
            "network_decline_code": "05", "network_status": "declined_by_network",
            "reason": ch.decline_reason, "risk_level": "normal", "risk_score": ch.risk_score,
            "seller_message": "The bank did not return any further details with this decline.",
            "type": "issuer_declined"}


def charge(ch: Charge, at: int) -> dict:
    refunds = ch.refunds_at(at)
    refunded = sum(r.amount for r in refunds)
    card, cust = ch.customer.card, ch.customer.attrs(ch.created)  # billing details as given at payment
    return {
        "id": ch.id, "object": "charge", "amount": ch.amount,
        "amount_captured": ch.amount if ch.succeeded else 0, "amount_refunded": refunded,
        "application": None, "application_fee": None, "application_fee_amount": None,
        "balance_transaction": ch.balance_transaction,
        "billing_details": {"address": dict(cust["address"]), "email": cust["email"], "name": cust["name"],
                            "phone": cust["phone"], "tax_id": None},
        "calculated_statement_descriptor": ch.statement_descriptor, "captured": ch.succeeded,
        "created": ch.created, "currency": ch.currency, "customer": ch.customer.id,
        "description": ch.description, "disputed": False, "failure_balance_transaction": None,
        "failure_code": ch.failure_code,
        "failure_message": None if ch.succeeded else _FAILURE_MESSAGES[ch.failure_code],
        "fraud_details": {}, "livemode": False, "metadata": {}, "on_behalf_of": None,
        "outcome": _outcome(ch), "paid": ch.succeeded, "payment_intent": ch.payment_intent,
        "payment_method": card.payment_method,
        "payment_method_details": {
            "card": {"amount_authorized": ch.amount if ch.succeeded else None, "authorization_code": None,
                     "brand": card.brand,
                     "checks": {"address_line1_check": "pass", "address_postal_code_check": "pass",
                                "cvc_check": "pass"},
                     "country": card.country, "exp_month": card.exp_month, "exp_year": card.exp_year,
                     "fingerprint": card.fingerprint, "funding": card.funding, "last4": card.last4,
                     "mandate": None, "network": card.brand, "network_transaction_id": None,
                     "regulated_status": "unregulated", "three_d_secure": None, "wallet": None},
            "type": "card"},
        "receipt_email": cust["email"],
        "receipt_number": ch.receipt_number,
        "receipt_url": f"https://pay.stripe.com/receipts/payment/{ch.id}",
        "refunded": refunded >= ch.amount and refunded > 0,
        "refunds": embedded_list(f"/v1/charges/{ch.id}/refunds", [refund(r) for r in reversed(refunds)]),
        "review": None, "shipping": None, "source": None, "source_transfer": None,
        "statement_descriptor": None, "statement_descriptor_suffix": None,
        "status": "succeeded" if ch.succeeded else "failed", "transfer_data": None,
        "transfer_group": None,
    }


_FAILURE_MESSAGES = {
    "card_declined": "Your card was declined.",
    "expired_card": "Your card has expired.",
    None: None,
}


def subscription_item(item: SubscriptionItem, sub: Subscription, at: int) -> dict:
    start, end = sub.period(at)
    return {
        "id": item.id, "object": "subscription_item", "billing_thresholds": None,
        "created": item.created, "current_period_end": end, "current_period_start": start,
        "discounts": [], "metadata": {}, "plan": plan(item.plan), "price": price(item.plan),
        "quantity": item.quantity, "subscription": sub.id, "tax_rates": [],
    }


def subscription(sub: Subscription, at: int) -> dict:
    latest = None
    for invoice_ in sub.invoices:
        if invoice_.created <= at:
            latest = invoice_.id
    canceled = sub.canceled_at is not None and sub.canceled_at <= at
    scheduled = canceled and sub.ended_at is not None and sub.ended_at > sub.canceled_at
    ended = sub.ended_at is not None and sub.ended_at <= at
    items = [subscription_item(item, sub, at) for item in sub.items]
    first_period = sub.periods[0] if sub.periods else (sub.created, sub.created)
    return {
        "id": sub.id, "object": "subscription", "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": sub.trial_end or first_period[0],
        "billing_cycle_anchor_config": None, "billing_mode": {"type": "classic"},
        "billing_schedules": [], "billing_thresholds": None,
        "cancel_at": sub.cancel_at if scheduled else None,
        "cancel_at_period_end": scheduled and not ended,
        "canceled_at": sub.canceled_at if canceled else None,
        "cancellation_details": {"comment": None,
                                 "feedback": sub.cancellation_feedback if canceled else None,
                                 "reason": sub.cancellation_reason if canceled else None},
        "collection_method": "charge_automatically", "created": sub.created,
        "currency": sub.items[0].plan.currency, "customer": sub.customer.id, "customer_account": None,
        "days_until_due": None, "default_payment_method": sub.customer.card.payment_method,
        "default_source": None, "default_tax_rates": [], "description": None,
        "discounts": [sub.discount_id] if sub.discount_id else [],
        "ended_at": sub.ended_at if ended else None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": embedded_list(f"/v1/subscription_items?subscription={sub.id}", items),
        "latest_invoice": latest, "livemode": False, "managed_payments": None,
        "metadata": {}, "next_pending_invoice_item_invoice": None, "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": None, "pending_setup_intent": None,
        "pending_update": None, "schedule": None, "start_date": sub.created,
        "status": sub.status(at), "test_clock": None, "transfer_data": None,
        "trial_end": sub.trial_end, "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": sub.trial_start,
    }


def invoice_line(line: InvoiceLine, inv: Invoice) -> dict:
    sub_id = inv.subscription.id if inv.subscription else None
    return {
        "id": line.id, "object": "line_item", "amount": line.amount, "currency": inv.currency,
        "description": line.description,
        "discount_amounts": ([{"amount": line.discount, "discount": inv.subscription.discount_id}]
                             if line.discount and inv.subscription else []),
        "discountable": True, "discounts": [], "invoice": inv.id, "livemode": False,
        "metadata": {},
        "parent": {"invoice_item_details": None,
                   "subscription_item_details": {"invoice_item": None, "proration": False,
                                                 "proration_details": {"credited_items": None},
                                                 "subscription": sub_id,
                                                 "subscription_item": line.subscription_item},
                   "type": "subscription_item_details"},
        "period": {"end": line.period[1], "start": line.period[0]},
        "pretax_credit_amounts": [],
        "pricing": {"price_details": {"price": line.plan.id, "product": line.plan.product.id},
                    "type": "price_details", "unit_amount_decimal": str(line.plan.amount)},
        "quantity": line.quantity, "quantity_decimal": str(line.quantity),
        "subscription": sub_id, "subtotal": line.amount, "taxes": [],
    }


def invoice(inv: Invoice, at: int) -> dict:
    status = inv.status(at)
    attempts = inv.attempts(at)
    paid = status == "paid"
    total = inv.total
    cust = inv.customer
    snapshot = cust.attrs(inv.created)  # the customer's details as copied onto the invoice
    sub_id = inv.subscription.id if inv.subscription else None
    lines = [invoice_line(line, inv) for line in inv.lines]
    finalized = inv.finalized_at if status != "draft" else None
    next_attempt = None
    if status == "open" and attempts:
        next_attempt = attempts[-1].created + 3 * 86_400
    elif status == "draft":
        next_attempt = inv.finalized_at
    return {
        "id": inv.id, "object": "invoice", "account_country": cust.card.country,
        "account_name": None, "account_tax_ids": None, "amount_due": total,
        "amount_overpaid": 0, "amount_paid": total if paid else 0,
        "amount_remaining": 0 if paid or status == "uncollectible" else total,
        "amount_shipping": 0, "application": None, "attempt_count": len(attempts),
        "attempted": bool(attempts) or paid, "auto_advance": status in ("draft", "open"),
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None,
                          "provider": None, "status": None},
        "automatically_finalizes_at": inv.finalized_at if status == "draft" else None,
        "billing_reason": inv.billing_reason, "collection_method": "charge_automatically",
        "created": inv.created, "currency": inv.currency, "custom_fields": None,
        "customer": cust.id, "customer_account": None, "customer_address": dict(snapshot["address"]),
        "customer_email": snapshot["email"], "customer_name": snapshot["name"], "customer_phone": snapshot["phone"],
        "customer_shipping": None, "customer_tax_exempt": "none", "customer_tax_ids": [],
        "default_payment_method": None, "default_source": None, "default_tax_rates": [],
        "description": None,
        "discounts": [inv.subscription.discount_id] if inv.discount and inv.subscription else [],
        "due_date": None, "effective_at": finalized, "ending_balance": 0 if finalized else None,
        "footer": None, "from_invoice": None,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/{inv.id}" if finalized else None,
        "invoice_pdf": f"https://pay.stripe.com/invoice/{inv.id}/pdf" if finalized else None,
        "issuer": {"type": "self"}, "last_finalization_error": None, "latest_revision": None,
        "lines": embedded_list(f"/v1/invoices/{inv.id}/lines", lines), "livemode": False,
        "metadata": {}, "next_payment_attempt": next_attempt,
        "number": inv.number if finalized else None, "on_behalf_of": None,
        "parent": {"quote_details": None,
                   "subscription_details": {"metadata": {}, "subscription": sub_id},
                   "type": "subscription_details"} if sub_id else None,
        "payment_settings": {"default_mandate": None, "payment_method_options": None,
                             "payment_method_types": None},
        "period_end": inv.period_end, "period_start": inv.period_start,
        "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0,
        "receipt_number": None, "rendering": None, "shipping_cost": None,
        "shipping_details": None, "starting_balance": 0, "statement_descriptor": None,
        "status": status,
        "status_transitions": {
            "finalized_at": finalized, "marked_uncollectible_at":
                inv.marked_uncollectible_at if status == "uncollectible" else None,
            "paid_at": inv.paid_at if paid else None, "voided_at": None},
        "subscription": sub_id, "subtotal": inv.subtotal, "subtotal_excluding_tax": inv.subtotal,
        "test_clock": None, "total": total,
        "total_discount_amounts": ([{"amount": inv.discount, "discount": inv.subscription.discount_id}]
                                   if inv.discount and inv.subscription else []),
        "total_excluding_tax": total, "total_pretax_credit_amounts": [], "total_taxes": [],
        "webhooks_delivered_at": inv.created,
    }


_RENDERERS: dict[type, Any] = {
    Customer: customer, Charge: charge, Coupon: coupon, Invoice: invoice, Plan: plan,
    Subscription: subscription, Refund: refund, Product: product,
}


def render_at(subject: object, at: int) -> dict:
    """The Stripe JSON of any generated fact as it was at `at`."""
    if isinstance(subject, AsPrice):
        return price(subject.plan)
    return _RENDERERS[type(subject)](subject, at)


def complete_events(history: "History", ids: Any, window_start: int) -> None:
    """Adds the `*.updated` events of every change the generator's own events do not announce.

    Renewals move a subscription's period, each invoice bumps its customer's
    `next_invoice_sequence`, each payment attempt changes an invoice: Stripe sends an event for
    each, so a change feed built on events misses nothing. (Coupons' `times_redeemed` changes
    without an event, as in Stripe.)
    """
    end = history.end
    announced = {(id(e.subject), e.created) for e in history.events}
    added: list[Event] = []

    def fill(subject: Any, times: Any, type_: str, renderer: Any, until: int | None = None) -> None:
        for at in sorted(set(times)):
            if at < window_start or at > end or (until is not None and at >= until) or (id(subject), at) in announced:
                continue
            before, after = renderer(subject, at - 1), renderer(subject, at)
            previous = {key: before.get(key) for key in after if before.get(key) != after[key]}
            if previous:
                announced.add((id(subject), at))
                added.append(Event(ids("evt_"), at, type_, subject, previous, None))

    for c in history.customers:
        fill(c, [*c.invoice_times, *(t for span in c.past_due_spans for t in span)], "customer.updated", customer,
             c.deleted_at)
    for sub in history.subscriptions:
        fill(sub, [*(t for t, _ in sub.statuses), *(start for start, _ in sub.periods),
                   *(i.created for i in sub.invoices), *(t for t in (sub.canceled_at, sub.ended_at, sub.trial_end) if t)],
             "customer.subscription.updated", subscription)
    for inv in history.invoices:
        fill(inv, [inv.created, *(t for t in (inv.finalized_at, inv.paid_at, inv.marked_uncollectible_at) if t),
                   *(ch.created for ch in inv.charges)], "invoice.updated", invoice)
    for ch in history.charges:
        fill(ch, [r.created for r in ch.refunds], "charge.updated", charge)
    history.events.extend(added)


def event(ev: Event) -> dict:
    obj = render_at(ev.subject, ev.created)
    previous = ev.previous_attributes
    if isinstance(ev.subject, Charge):  # includable fields never ride in event payloads
        obj.pop("refunds", None)
        previous = None if previous is None else {k: v for k, v in previous.items() if k != "refunds"}
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": ev.id, "object": "event", "api_version": API_VERSION, "created": ev.created,
        "data": data, "livemode": False, "pending_webhooks": 0,
        "request": {"id": ev.request_id, "idempotency_key": None}, "type": ev.type,
    }
