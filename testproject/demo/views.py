"""Views of the test project: views that send tasks, as a web project would."""

from django.http import JsonResponse

from testproject.demo import tasks


async def send_tasks(request):
    """``apply_async`` from async code: one delayed call, one sent at once."""
    queue = request.GET["queue"]
    delayed = tasks.add.apply_async((1, 2), countdown=3600, queue=queue)
    now = tasks.add.apply_async((3, 4), queue=queue)
    return JsonResponse({"delayed": delayed.id, "now": now.id})


def publish(request):
    """A plain (WSGI) view that sends one task."""
    return JsonResponse({"id": tasks.add.apply_async((1, 2), queue=request.GET["queue"]).id})
