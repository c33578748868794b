"""fedpref.client: the device SDK (:class:`Device`) and the Flower ClientApp."""

from .consent import Consent, Level
from .device import Device, NoModelError
from .eligibility import ALWAYS, Conditions, EligibilityPolicy
from .inputs import InvalidInput
from .ledger import PrivacyReport
from .store import EventStore, Retention, StoreError

__all__ = [
    "ALWAYS",
    "Conditions",
    "Consent",
    "Device",
    "EligibilityPolicy",
    "EventStore",
    "InvalidInput",
    "Level",
    "NoModelError",
    "PrivacyReport",
    "Retention",
    "StoreError",
]
