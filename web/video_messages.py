"""The texts of the video panel (``video_panel.html`` and ``video.js``), in the page's language.

:data:`ENGLISH` is the one table of what the panel shows to a person: keys to English texts,
which are also the gettext message ids of the kiosk's catalog (``web/translations/``;
``pybabel extract`` finds them through the :func:`N_` marker). The page gets the table,
translated, as JSON in a ``<script type="application/json" id="video-messages">`` block
(data, never run: the CSP allows no inline script); ``video.js`` keeps the same English
table built in, for any key the page's table lacks. ``{name}``-style placeholders are
filled in by ``video.js`` (through ``textContent``). The kiosk's page is in the check-in's
language; the nurse's and the provider's pages are in English.
"""

from __future__ import annotations

from collections.abc import Callable


def N_(message: str) -> str:
    """Mark ``message`` for ``pybabel extract`` (gettext's usual name for a "translate later"
    marker); translated when the page is rendered."""
    return message


ENGLISH: dict[str, str] = {
    # video_panel.html
    "panelTitle": N_("Video"),
    "notStarted": N_("Not started."),
    "you": N_("You"),
    "start": N_("Start video"),
    "peopleTitle": N_("In the visit"),
    "leave": N_("Leave the video"),
    "end": N_("End the visit for everyone"),
    # the list of people
    "nobody": N_("Nobody yet."),
    "rolePatient": N_("Patient"),
    "roleNurse": N_("Nurse"),
    "roleProvider": N_("Provider"),
    "roleCamera": N_("Exam camera"),
    "isYou": N_("{name} (you)"),
    "presenceWaiting": N_("waiting to be admitted"),
    "presenceAdmitted": N_("in the visit"),
    "mutedAudio": N_("audio muted"),
    "mutedVideo": N_("video muted"),
    "mutedBoth": N_("audio and video muted"),
    "weak": N_("weak connection: audio only"),
    "reconnecting": N_("connection lost, reconnecting…"),
    "admit": N_("Admit"),
    "muteAudio": N_("Mute audio"),
    "unmuteAudio": N_("Unmute audio"),
    "muteVideo": N_("Mute video"),
    "unmuteVideo": N_("Unmute video"),
    # one's own buttons and tiles
    "micMute": N_("Mute my microphone"),
    "micUnmute": N_("Unmute my microphone"),
    "cameraOff": N_("Turn my camera off"),
    "cameraOn": N_("Turn my camera on"),
    "paused": N_("Video paused: weak connection. Audio continues."),
    "sending": N_("sending {size}"),
    "confirmEnd": N_("End the visit for everyone? It cannot be joined again."),
    # the status line
    "connecting": N_("Connecting…"),
    "startingMedia": N_("Starting your camera and microphone…"),
    "mediaFailed": N_("Your camera or microphone could not be started ({error})."),
    "connectingVideo": N_("Connecting the video…"),
    "inVisit": N_("In the visit."),
    "mediaDropped": N_("The connection dropped. Reconnecting the video…"),
    "waiting": N_("Waiting for the nurse to let you in…"),
    "left": N_("You left the video."),
    "joinedElsewhere": N_(
        "You joined this visit from another window or device, so this one has left the video."
    ),
    "ended": N_("The visit has ended."),
    "streamFailed": N_("A video stream could not be opened ({error})."),
    "refused": N_("The visit refused that: {message}"),
    "seatLost": N_("Your place in the visit was lost. Joining again…"),
    "socketDropped": N_("The connection to the visit dropped. Reconnecting…"),
    "disconnected": N_("Disconnected."),
    "retaking": N_("Taking your place in the visit again…"),
}


def video_messages(gettext_: Callable[[str], str] | None = None) -> dict[str, str]:
    """The panel's table translated by ``gettext_`` (a catalog's ``gettext``); English
    without one."""
    if gettext_ is None:
        return dict(ENGLISH)
    return {key: gettext_(text) for key, text in ENGLISH.items()}
