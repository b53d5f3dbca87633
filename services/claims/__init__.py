"""Originating-site facility-fee claims (HCPCS Q3014), issue 8.

A finished telehealth visit with the patient at this site becomes a draft claim when the
data says it is billable (:mod:`.rules`, :mod:`.eligibility`); the claim is kept as an
encrypted FHIR ``Claim`` (:mod:`.fhir_claim`) with its state in the ``claims`` table
(:mod:`.model`), checked before submission (:mod:`.checks`), and rendered as X12 837P/837I
(:mod:`.x12`) that pyx12 validates (:mod:`.x12_validation`). :mod:`.service` ties them to
the store; :mod:`.cli` is ``appliance claims``. Decisions: docs/adr/0006-claims.md.
"""
