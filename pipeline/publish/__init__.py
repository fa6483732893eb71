"""What the bureau reads: the offline inspector map and the monthly report, with their templates and assets.

Both read the month's view of the ledger (:func:`pipeline.ledger.view.load_month_view`) and the
ledger's vocabulary (:mod:`pipeline.ledger.labels`). Modules: :mod:`~pipeline.publish.maps` (the page),
:mod:`~pipeline.publish.maplayers` (its GeoJSON layers and styling), :mod:`~pipeline.publish.mapimagery`
(image overlay and chips) and :mod:`~pipeline.publish.report` (the report). Nothing is re-exported here:
import each name from the module that defines it.
"""
