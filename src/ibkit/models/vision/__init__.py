"""Image encoders behind one interface (:class:`ibkit.models.vision.base.VisionEncoder`)."""
