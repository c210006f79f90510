from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_celery_fulldbresult", "0004_chord_parts"),
    ]

    operations = [
        migrations.AddField(
            model_name="chordcounter",
            name="added",
            field=models.PositiveIntegerField(default=0),
        ),
    ]
